"""parnet-cpu on Ray (the optional `ray` extra: `pip install 'parnet-cpu[ray]'`): past one machine on an
existing engine. Nothing else in parnet_cpu imports this package (`.importlinter`), except `parnet-cpu serve
--ray` / `predict --ray` when asked; importing it imports Ray.

- `deployment(model_dir, replicas=N)`: a Ray Serve application speaking `parnet-cpu serve`'s HTTP API, each
  replica one `Runtime` on its own leased cores (`deployment.py`).
- `predict(model_dir, paths)`: `parnet-cpu predict`'s rows from Ray Data, decoding in tasks and inference in
  an actor pool of leased Runtimes (`batch.py`).
"""
from parnet_cpu.ray.batch import predict
from parnet_cpu.ray.deployment import deployment, run_server

__all__ = ["deployment", "predict", "run_server"]
