"""The serve job (``jobs/serve.py``): a P-Soups run over HTTP (Ray Serve), per-request weighted
soups, batched.

    python jobs/serve.py --config configs/serve.yaml [--output_dir outputs/soups] [--port 8000]
    python jobs/serve.py --demo outputs/serve-demo     # builds a tiny random run first, then serves it
    python jobs/serve.py --mlflow_run <run id> --tracking_uri sqlite:///outputs/soups/mlflow.db
    python jobs/serve.py --registered_model 'soup_0.5/1' --tracking_uri sqlite:///outputs/soups/mlflow.db
    curl -s 127.0.0.1:8000/v1/generate -H 'content-type: application/json' \\
         -d '{"prompt": "tell me about rivers", "preferences": {"P1A": 0.5, "P2A": 0.5}}'

The config file is a Ray Serve config (``serve run configs/serve.yaml`` works too); flags
override its app args and HTTP options. Ctrl-C or SIGTERM shuts Serve down cleanly. A host other
than loopback is refused unless ``--allow_remote`` (then use ``--auth_token_file`` or an
authenticating proxy: docs/SERVING.md).
"""
from __future__ import annotations

import argparse
import signal
import time

import yaml


def load_serve_config(path: str) -> tuple[dict, dict, dict]:
    """(http_options, app args, deployment options) of the config's soups application."""
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    apps = [a for a in cfg.get("applications", []) if a.get("import_path", "").startswith("raypref.serve.app:")]
    if len(apps) != 1:
        raise SystemExit(f"{path}: expected one application with import_path raypref.serve.app:build_app, "
                         f"found {len(apps)}")
    deployments = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in apps[0].get("deployments", [])}
    return cfg.get("http_options", {}), dict(apps[0].get("args", {})), deployments.get("SoupsServer", {})


def parser() -> argparse.ArgumentParser:
    """The serve job's flags: spelled with underscores like every job's (the old hyphenated
    spellings, e.g. --output-dir, still work)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def flag(name: str, **kwargs) -> None:
        spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        p.add_argument(*spellings, dest=name, **kwargs)

    flag("config", default="configs/serve.yaml", help="Ray Serve config file")
    flag("output_dir", help="the soups run to serve (overrides the config's args.output_dir)")
    flag("mlflow_run", help="or: the soups job's MLflow run id (its output folder tag)")
    flag("registered_model", help="or: a registered soup, name/version or name@alias (its source run)")
    flag("tracking_uri", help="MLflow store for --mlflow_run / --registered_model")
    flag("demo", metavar="DIR", help="build a tiny soups run with random adapters in DIR and serve it")
    flag("host", help="bind address (default from the config: 127.0.0.1)")
    flag("port", type=int)
    flag("num_replicas", type=int, help="fixed replica count (replaces autoscaling)")
    flag("allow_remote", action="store_true", help="allow a --host beyond loopback (read docs/SERVING.md)")
    flag("auth_token_file", help="require 'Authorization: Bearer <token>' with the token in this file")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)

    http, app_args, deployment = load_serve_config(args.config)
    if args.demo:
        from raypref.serve.demo import build_demo_run

        app_args["output_dir"] = str(build_demo_run(args.demo))
    if args.output_dir:
        app_args["output_dir"] = args.output_dir
    for flag, field in (("mlflow_run", "mlflow_run_id"), ("registered_model", "registered_model")):
        if getattr(args, flag):  # replaces the config's output folder
            app_args.pop("output_dir", None)
            app_args[field] = getattr(args, flag)
    if args.tracking_uri:
        app_args["tracking_uri"] = args.tracking_uri
    if args.auth_token_file:
        app_args["auth_token_file"] = args.auth_token_file
    if args.num_replicas:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = args.num_replicas
    host, port = args.host or http.get("host", "127.0.0.1"), args.port or http.get("port", 8000)

    import ray
    from ray import serve

    from raypref import ray_session
    from raypref.serve.app import SoupsServer, check_bind, prepare

    try:
        server_args, policies = prepare(app_args)
        check_bind(host, args.allow_remote, server_args.auth_token_file)
    except (ValueError, MemoryError) as e:  # pydantic's ValidationError and PolicyDiscoveryError are ValueErrors
        raise SystemExit(f"serve: {e}") from None
    ray_session.init(include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(SoupsServer.options(**deployment).bind(server_args.model_dump()), name="soups", route_prefix="/")
    print(f"serving {policies.preferences} of {policies.run_dir} (version {policies.version}) "
          f"at http://{host}:{port}  (OpenAPI: /docs, /openapi.json); Ctrl-C to stop", flush=True)
    # Ctrl-C (even where a launcher started us with SIGINT ignored) and SIGTERM (docker stop, k8s,
    # systemd) both end in the clean shutdown below. Short sleeps: Ray's threads may take the
    # signal, and Python runs the handler only when the main thread next runs bytecode.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
