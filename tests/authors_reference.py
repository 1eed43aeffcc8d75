"""An independent, functional re-statement of the authors' released forward pass (SimpNet/RepVGGOur/
RepVGGBlock/SE1/MultiBatchNorm2d/Concat2d in imankgoyal/NonDeepNetworks), evaluated directly on a state
dict in *their* key layout. Tests use it to check that our module + key mapping compute the same thing.
Written from the facts of their code, not copied: semantics only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _bn(sd, p, x, eps=1e-5):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, eps)


def _shuffle(x, groups):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


def block(sd, p, x, stride, groups=1, act=F.relu):
    """RepVGGOur(...).block = RepVGGBlock(kernel 3, padding 1, avg_pool=True, se_block=True)."""
    p = p + ".block"
    wd = sd[p + ".rbr_dense.conv.weight"]
    dense = _bn(sd, p + ".rbr_dense.bn", F.conv2d(x, wd, None, stride, 1, 1, groups))
    if stride == 2:
        one = _bn(sd, p + ".rbr_1x1.1.bn", F.conv2d(F.avg_pool2d(x, 2, 2), sd[p + ".rbr_1x1.1.conv.weight"],
                                                     None, 1, 0, 1, groups))
    else:
        one = _bn(sd, p + ".rbr_1x1.bn", F.conv2d(x, sd[p + ".rbr_1x1.conv.weight"], None, 1, 0, 1, groups))
    se_w = sd[p + ".se.cvsig.conv.weight"]

    def se(t, ver):
        g = torch.sigmoid(F.conv2d(F.adaptive_avg_pool2d(t, 1), se_w, None, 1, 0, 1, groups))
        return 2 * g if ver == 2 else g

    has_id = (p + ".rbr_identity.weight") in sd
    if has_id:
        idn = _bn(sd, p + ".rbr_identity", x)
        out = dense + one + idn * se(idn, 1)
    else:
        out = (dense + one) * se(x, 2)
    out = act(out)
    return _shuffle(out, groups) if groups > 1 else out


def _concat_shuffle(a, b):
    b_, _, h, w = a.shape
    return torch.cat([a.unsqueeze(1), b.unsqueeze(1)], 1).transpose(1, 2).reshape(b_, -1, h, w)


def forward(sd, x, num_blocks=(5, 6, 6, 1), stem_stride=2, act=F.relu):
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    n1, n2, n3, _ = num_blocks
    s = block(sd, "inits.0.0", x, stem_stride, act=act)
    s = block(sd, "inits.0.1", s, 2, act=act)
    x2 = block(sd, "inits.1", s, 2, act=act)
    x3 = block(sd, "inits.2", x2, 2, act=act)
    ys = []
    for i, (t, n) in enumerate(((s, n1), (x2, n2), (x3, n3))):
        for j in range(n - 1):
            t = block(sd, f"streams.{i}.{j}", t, 1, act=act)
        ys.append(t)
    y_old = block(sd, "downsamples_2.0", ys[0], 2, act=act)
    a, b = _bn(sd, "downsamples_2.1.0.b1", ys[1]), _bn(sd, "downsamples_2.1.0.b2", y_old)
    y_old = block(sd, "downsamples_2.1.2", _concat_shuffle(a, b), 2, groups=2, act=act)
    a, b = _bn(sd, "combine.0.b1", ys[2]), _bn(sd, "combine.0.b2", y_old)
    out = block(sd, "combine.2", _concat_shuffle(a, b), 1, groups=2, act=act)
    out = block(sd, "combine.3", out, 2, act=act)
    return F.linear(out.mean((2, 3)), sd["head.fc.weight"], sd["head.fc.bias"])


def author_keys_for(our_key: str, stride2_blocks: set[str]) -> str:
    """Our key -> the authors' key (used only by tests, to write checkpoints in their layout)."""
    for ours, theirs in ((".dense.", ".block.rbr_dense."), (".identity_bn.", ".block.rbr_identity."),
                         (".se.conv.", ".block.se.cvsig.conv.")):
        if ours in our_key:
            return our_key.replace(ours, theirs)
    if ".pointwise." in our_key:
        prefix = our_key.split(".pointwise.")[0]
        return our_key.replace(".pointwise.", ".block.rbr_1x1.1." if prefix in stride2_blocks else ".block.rbr_1x1.")
    return our_key
