"""Ray Serve application: the policies of one P-Soups run behind an HTTP JSON API.

    POST /v1/generate     {prompt, preferences: {name: weight}, max_new_tokens, temperature, seed,
                           normalize} -> {text, weights, model_version, served_by, n_tokens}
    GET  /v1/preferences  the served preferences, the run they came from, the limits
    GET  /healthz         liveness
    GET  /openapi.json    the schema (FastAPI)

Requests with different weights are batched together (``@serve.batch``) and decoded in one
forward per step, each row with its own soup (``raypref.serve.engine``). Bad input is answered
with 422 naming the field before it reaches the batch. ``build_app`` is the builder for
``serve run`` / a Serve config file; ``serve_soups`` starts it bound to 127.0.0.1.

The run is found by its output folder, or by the soups job's MLflow run (``mlflow_run_id``) or one
of the soups it registered (``registered_model``), which lead to that folder. Several runs of
that folder (``runs/<training key>``) are served through Serve's model multiplexing: the HTTP
header ``serve_multiplexed_model_id: <training key>`` picks one (no header: the default run);
each replica keeps up to ``MAX_RUNS_PER_REPLICA`` loaded and Serve routes a run's requests to
the replicas that hold it.
"""

import asyncio
import os
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator
from ray import serve

from raypref import tracking

from raypref.serve.engine import GenerationRequest, SoupEngine
from raypref.serve.policies import PolicyDiscoveryError, SoupPolicies, find_policies
from raypref.serve.schema import (GenerateRequest, GenerateResponse, InvalidField, PreferencesResponse,
                                  check_lengths, soup_weights)

DEFAULT_MAX_NEW_TOKENS = 32  # when a request does not say (capped by the server's limit)
MAX_RUNS_PER_REPLICA = 3  # multiplexed runs a replica keeps loaded (least recently used unloaded)
MODEL_ID_HEADER = "serve_multiplexed_model_id"  # Ray Serve's multiplexing header

api = FastAPI(title="raypref P-Soups server",
              description="Personalized soups of LoRA policies, weighted per request (exact: base + Σ wᵢ ΔWᵢ).")


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, minus the offending input: a NaN or infinite weight cannot be echoed as JSON
    (echoing it made the default handler fail with a 500)."""
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": detail})


class ServerArgs(BaseModel):
    """Arguments of the app builder (``serve run ... output_dir=...`` or a Serve config's ``args``)."""

    output_dir: str | None = Field(None, description="the soups job's output folder (holds runs/<key>/<pref>/final)")
    mlflow_run_id: str | None = Field(None, description="or: the soups job's MLflow run (its output folder tag)")
    registered_model: str | None = Field(None, description="or: a soup it registered, 'name/version' or "
                                                           "'name@alias' (its source run's output folder)")
    tracking_uri: str | None = Field(None, description="MLflow store of mlflow_run_id / registered_model "
                                                       "(default $MLFLOW_TRACKING_URI)")
    training_key: str | None = Field(None, description="the default runs/<key>; default: the newest finished one")
    preferences: list[str] | None = Field(None, description="serve only these preferences")
    max_new_tokens: int = Field(128, ge=1)
    max_prompt_tokens: int = Field(512, ge=1)
    cache_size: int = Field(4, ge=0, description="materialized soups kept for hot weight vectors")
    hot_after: int = Field(3, ge=1, description="requests for one weight vector before it is materialized")
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    torch_threads: int = Field(0, ge=0, description="0: torch's default")

    @model_validator(mode="after")
    def _one_source(self) -> "ServerArgs":
        given = [f for f in ("output_dir", "mlflow_run_id", "registered_model") if getattr(self, f)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of output_dir, mlflow_run_id, registered_model; got {given or 'none'}")
        if given[0] != "output_dir" and not (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            raise ValueError(f"{given[0]} needs tracking_uri (or $MLFLOW_TRACKING_URI)")
        return self

    def resolved_output_dir(self) -> Path:
        """The output folder, looked up in MLflow when the run is given that way."""
        if self.output_dir:
            return Path(self.output_dir)
        uri = self.tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
        try:
            return tracking.run_output_dir(uri, run_id=self.mlflow_run_id, registered_model=self.registered_model)
        except LookupError as e:
            raise PolicyDiscoveryError(str(e)) from None


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
@serve.ingress(api)
class SoupsServer:
    def __init__(self, args: dict | ServerArgs):
        import torch

        self.args = ServerArgs.model_validate(args) if isinstance(args, dict) else args
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        self.output_dir = self.args.resolved_output_dir()
        self.policies = find_policies(self.output_dir, self.args.training_key, self.args.preferences)
        self.engine = self._engine(self.policies)
        self.default_run = self.policies.run_dir.name
        self.max_prompt_tokens = min(self.args.max_prompt_tokens, self.engine.max_positions - 1)
        self._generate_batch.set_max_batch_size(self.args.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    def _engine(self, policies: SoupPolicies) -> SoupEngine:
        return SoupEngine.from_policies(policies, cache_size=self.args.cache_size, hot_after=self.args.hot_after)

    @serve.multiplexed(max_num_models_per_replica=MAX_RUNS_PER_REPLICA)
    async def _load_run(self, run: str) -> tuple[SoupPolicies, SoupEngine]:
        policies = find_policies(self.output_dir, run, self.args.preferences)
        return policies, await asyncio.to_thread(self._engine, policies)

    async def _served(self) -> tuple[SoupPolicies, SoupEngine]:
        """The run this request (or batch: Serve splits batches by model id) asks for."""
        run = serve.get_multiplexed_model_id()
        if not run or run == self.default_run:
            return self.policies, self.engine
        try:
            return await self._load_run(run)
        except PolicyDiscoveryError as e:
            raise HTTPException(status_code=404, detail=[{"loc": ["header", MODEL_ID_HEADER], "msg": str(e),
                                                          "type": "value_error"}]) from None

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model_version": self.policies.version}

    @api.get("/v1/preferences", response_model=PreferencesResponse)
    async def preferences(self) -> PreferencesResponse:
        policies, engine = await self._served()
        return PreferencesResponse(preferences=engine.names, run_dir=str(policies.run_dir),
                                   base_dir=str(policies.base_dir), model_version=policies.version,
                                   max_new_tokens=self.args.max_new_tokens, max_prompt_tokens=self.max_prompt_tokens)

    @api.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        policies, engine = await self._served()
        max_new = req.max_new_tokens or min(self.args.max_new_tokens, DEFAULT_MAX_NEW_TOKENS)
        req = req.model_copy(update={"max_new_tokens": max_new})
        try:
            weights = soup_weights(req, engine.names)
            check_lengths(req, engine.prompt_length(req.prompt), self.args.max_new_tokens,
                          self.max_prompt_tokens, engine.max_positions)
        except InvalidField as e:
            raise HTTPException(status_code=422, detail=e.detail()) from None
        item = GenerationRequest(req.prompt, weights, max_new, req.temperature, req.seed)
        result = await self._generate_batch(item)
        return GenerateResponse(text=result.text, weights=dict(zip(engine.names, weights)),
                                model_version=policies.version, served_by=result.served_by,
                                token_ids=result.token_ids)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, items: list[GenerationRequest]):
        _, engine = await self._served()  # one run per batch
        # off the event loop, so requests keep queueing for the next batch meanwhile
        return await asyncio.to_thread(engine.generate, items)


def build_app(args: dict) -> serve.Application:
    """App builder: ``serve run raypref.serve.app:build_app output_dir=outputs/soups``."""
    server_args = ServerArgs.model_validate(args)
    find_policies(server_args.resolved_output_dir(), server_args.training_key, server_args.preferences)  # fail early
    return SoupsServer.bind(server_args.model_dump())


def serve_soups(args: dict, host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/",
                name: str = "soups") -> str:
    """Start Serve's HTTP proxy on ``host:port`` (loopback unless told otherwise), deploy the app,
    and return its base URL. ``serve.shutdown()`` stops it."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


__all__ = ["MODEL_ID_HEADER", "SoupsServer", "ServerArgs", "build_app", "serve_soups", "api"]
