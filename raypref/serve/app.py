"""Ray Serve application: the policies of one P-Soups run behind an HTTP JSON API.

    POST /v1/generate     {prompt, preferences: {name: weight}, max_new_tokens, temperature, seed,
                           normalize} -> {text, weights, model_version, served_by, n_tokens}
    GET  /v1/preferences  the served preferences, the run they came from, the limits
    POST /v1/chat/completions  OpenAI-compatible (messages, max_tokens, temperature, seed, stream;
                          the soup weights in the extra body field ``preferences``)
    GET  /v1/models       OpenAI-compatible: the runs served
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
the replicas that hold it. An unknown run id is answered 404 before the multiplexer is asked
(so it never unloads a real run for it), and no answer names a server path.

Limits (hostile or unlucky clients): bodies over ``MAX_BODY_BYTES`` get 413; more than
``MAX_PREFERENCE_KEYS`` preferences, weights whose sum overflows, or any other bad value of the
request get 422; a temperature below ``GREEDY_BELOW_TEMPERATURE`` decodes greedily; a request
still waiting after ``request_timeout_s`` gets 504; past ``max_ongoing_requests`` +
``max_queued_requests`` per replica Serve answers 503 (retry later). A request whose generation
fails gets its own 500; the other requests of its batch are answered as usual. At start-up the
replica refuses to load when the runs it may hold (the default + ``MAX_RUNS_PER_REPLICA``) times
their model copies (base, soup, ``cache_size`` merges) do not fit the free memory.

Binding: loopback only unless ``allow_remote`` (``jobs/serve.py --allow-remote``); then protect
it with ``auth_token_file`` (every route but ``/healthz`` needs ``Authorization: Bearer <token>``)
or an authenticating reverse proxy in front. See docs/SERVING.md.
"""

import asyncio
import ipaddress
import logging
import os
import sys
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError, model_validator
from ray import serve

from raypref import tracking
from raypref.serve import guard
from raypref.serve.guard import RequestGuard, read_token

from raypref.serve.engine import GenerationError, GenerationRequest, SoupEngine, memory_needed
from raypref.serve.policies import (PolicyDiscoveryError, SoupPolicies, find_policies, finished_runs,
                                    is_finished_run)
from raypref.serve.openai_api import chat_completion_body
from raypref.serve.schema import (ChatCompletionRequest, GenerateRequest, GenerateResponse,
                                  InvalidField, PreferencesResponse, check_lengths, soup_weights)

DEFAULT_MAX_NEW_TOKENS = 32  # when a request does not say (capped by the server's limit)
MAX_RUNS_PER_REPLICA = 3  # multiplexed runs a replica keeps loaded (least recently used unloaded)
MODEL_ID_HEADER = "serve_multiplexed_model_id"  # Ray Serve's multiplexing header
MAX_ONGOING_REQUESTS = 16  # per replica, in the batcher or decoding
MAX_QUEUED_REQUESTS = 64  # per replica waiting for a slot; past this Serve answers 503
logger = logging.getLogger(__name__)

api = FastAPI(title="raypref P-Soups server",
              description="Personalized soups of LoRA policies, weighted per request (exact: base + Σ wᵢ ΔWᵢ).")


api.add_middleware(RequestGuard)


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
    request_timeout_s: float = Field(60.0, gt=0, description="a request not answered by then gets 504")
    auth_token_file: str | None = Field(None, description="a file holding a bearer token every route but "
                                                          "/healthz requires (read by each replica)")

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


def _unknown_run() -> HTTPException:
    return HTTPException(status_code=404, detail=[{
        "loc": ["header", MODEL_ID_HEADER], "type": "value_error",
        "msg": "no finished run of that name is served here (GET /v1/models lists them)"}])


def check_memory(policies: SoupPolicies, cache_size: int, available: int | None = None) -> int:
    """Refuse to start when the runs a replica may hold (the default one + ``MAX_RUNS_PER_REPLICA``
    multiplexed) with their model copies do not fit ``available`` bytes (default: the free memory)."""
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    runs = 1 + MAX_RUNS_PER_REPLICA
    needed = memory_needed(policies.base_dir, policies.adapters.values(), cache_size, runs)
    if needed > available:
        raise MemoryError(f"serving needs about {needed / 2**30:.2f} GiB ({runs} runs x (base + soup + "
                          f"cache_size={cache_size} merged copies)) but {available / 2**30:.2f} GiB is free; "
                          f"lower cache_size or give the replica more memory")
    return needed


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool, auth_token_file: str | None) -> None:
    """Loopback unless told otherwise; beyond it, say loudly what protects the API."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise ValueError(f"refusing to bind {host!r}: the API would be reachable beyond this machine. Pass "
                         f"allow_remote (jobs/serve.py --allow-remote) and protect it with auth_token_file "
                         f"or an authenticating reverse proxy (docs/SERVING.md)")
    if not auth_token_file:
        print(f"WARNING: serving on {host} WITHOUT authentication: anyone who reaches this port can use "
              f"the API. Put an authenticating reverse proxy in front, or set auth_token_file.",
              file=sys.stderr, flush=True)


# (the helpers above come before the class: Serve serializes it when decorated, and a module
# function defined below it was a NameError in the replica)
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=MAX_ONGOING_REQUESTS,
                  max_queued_requests=MAX_QUEUED_REQUESTS)
@serve.ingress(api)
class SoupsServer:
    def __init__(self, args: dict | ServerArgs):
        import torch

        self.args = ServerArgs.model_validate(args) if isinstance(args, dict) else args
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        guard.set_token(read_token(self.args.auth_token_file))
        self.output_dir = self.args.resolved_output_dir()
        self.policies = find_policies(self.output_dir, self.args.training_key, self.args.preferences)
        check_memory(self.policies, self.args.cache_size)  # on the replica's own node
        self.engine = self._engine(self.policies)
        self.default_run = self.policies.run_dir.name
        self.run_loads = 0  # multiplexed runs loaded since start (reported by /healthz)
        self.max_prompt_tokens = min(self.args.max_prompt_tokens, self.engine.max_positions - 1)
        self._generate_batch.set_max_batch_size(self.args.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    def _engine(self, policies: SoupPolicies) -> SoupEngine:
        return SoupEngine.from_policies(policies, cache_size=self.args.cache_size, hot_after=self.args.hot_after)

    def _load(self, run: str) -> tuple[SoupPolicies, SoupEngine]:
        """Find (hashes the weight files) and load a run: slow, so called off the event loop."""
        policies = find_policies(self.output_dir, run, self.args.preferences)
        self.run_loads += 1
        return policies, self._engine(policies)

    @serve.multiplexed(max_num_models_per_replica=MAX_RUNS_PER_REPLICA)
    async def _load_run(self, run: str) -> tuple[SoupPolicies, SoupEngine]:
        return await asyncio.to_thread(self._load, run)

    async def _served(self) -> tuple[SoupPolicies, SoupEngine]:
        """The run this request (or batch: Serve splits batches by model id) asks for. An id that
        is not a finished run is refused here, before the multiplexer (which unloads its least
        recently used run to make room before it calls the loader) sees it."""
        run = serve.get_multiplexed_model_id()
        if not run or run == self.default_run:
            return self.policies, self.engine
        if not await asyncio.to_thread(is_finished_run, self.output_dir, run):
            raise _unknown_run()
        try:
            return await self._load_run(run)
        except PolicyDiscoveryError as e:  # a finished run that is unusable: the reason goes to the log only
            logger.warning("run %r cannot be served: %s", run, e)
            raise _unknown_run() from None

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model_version": self.policies.version, "run_loads": self.run_loads}

    @api.get("/v1/preferences", response_model=PreferencesResponse)
    async def preferences(self) -> PreferencesResponse:
        policies, engine = await self._served()
        return PreferencesResponse(preferences=engine.names, run=policies.run_dir.name,
                                   model_version=policies.version, max_new_tokens=self.args.max_new_tokens,
                                   max_prompt_tokens=self.max_prompt_tokens)

    @api.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        policies, engine = await self._served()
        result, weights = await self._generate_one(req, engine)
        return GenerateResponse(text=result.text, weights=weights, model_version=policies.version,
                                served_by=result.served_by, token_ids=result.token_ids)

    async def _generate_one(self, req: GenerateRequest, engine: SoupEngine):
        """Validate against the served run, then decode in a batch: (result, the weights used)."""
        max_new = req.max_new_tokens or min(self.args.max_new_tokens, DEFAULT_MAX_NEW_TOKENS)
        req = req.model_copy(update={"max_new_tokens": max_new})
        try:
            weights = soup_weights(req, engine.names)
            check_lengths(req, engine.prompt_length(req.prompt), self.args.max_new_tokens,
                          self.max_prompt_tokens, engine.max_positions)
        except InvalidField as e:
            raise HTTPException(status_code=422, detail=e.detail()) from None
        except ArithmeticError as e:  # any other arithmetic failure on the request's own values is its fault
            raise HTTPException(status_code=422, detail=InvalidField("preferences", type(e).__name__).detail()) from None
        result = await self._submit(GenerationRequest(req.prompt, weights, max_new, req.temperature, req.seed))
        return result, dict(zip(engine.names, weights))

    @api.get("/v1/models")
    async def models(self) -> dict:
        """OpenAI's model list: the finished runs of the output folder (pick one with the
        ``serve_multiplexed_model_id`` header; the default run needs none)."""
        runs = await asyncio.to_thread(finished_runs, self.output_dir)
        return {"object": "list", "data": [{"id": run, "object": "model", "created": 0, "owned_by": "raypref"}
                                           for run in runs]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest):
        """OpenAI-compatible chat completion on the same per-request soups as /v1/generate."""
        policies, engine = await self._served()
        run = policies.run_dir.name
        if req.model != run:  # routing to a replica holding a run goes by the header, not the body
            raise HTTPException(status_code=404, detail=[{
                "loc": ["body", "model"], "type": "value_error",
                "msg": f"this request is served by run {run!r}; to use another, send it in the header "
                       f"{MODEL_ID_HEADER} as well (GET /v1/models lists the runs)"}])
        try:
            gen = GenerateRequest(prompt=req.prompt(), preferences=req.preferences or {n: 1.0 for n in engine.names},
                                  normalize=req.normalize or req.preferences is None,
                                  max_new_tokens=req.max_tokens or req.max_completion_tokens,
                                  temperature=req.temperature, seed=req.seed or 0)
        except InvalidField as e:
            raise HTTPException(status_code=422, detail=e.detail()) from None
        except ValidationError as e:  # e.g. a blank last user message
            raise HTTPException(status_code=422, detail=[{"loc": ["body", "messages"], "type": "value_error",
                                                          "msg": err.get("msg", "")} for err in e.errors()]) from None
        result, weights = await self._generate_one(gen, engine)
        return chat_completion_body(result, run, weights, policies.version, engine.prompt_length(gen.prompt),
                                    engine.tokenizer.eos_token_id, req.stream, engine.tokenizer)

    async def _submit(self, item: GenerationRequest):
        """Into the batcher, with the request timeout; this request's own failure is its own 500."""
        try:
            result = await asyncio.wait_for(self._generate_batch(item), self.args.request_timeout_s)
        except TimeoutError:
            raise HTTPException(status_code=504, detail=[{"loc": [], "type": "timeout", "msg":
                                f"not answered within {self.args.request_timeout_s} s"}]) from None
        if isinstance(result, GenerationError):
            raise HTTPException(status_code=500, detail=[{"loc": [], "type": "generation", "msg": str(result)}])
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, items: list[GenerationRequest]):
        _, engine = await self._served()  # one run per batch
        # off the event loop, so requests keep queueing for the next batch meanwhile; per-request
        # results or GenerationErrors, so one failing request does not fail its batch
        return await asyncio.to_thread(engine.generate, items)


def prepare(args: dict | ServerArgs, available_memory: int | None = None) -> tuple[ServerArgs, SoupPolicies]:
    """Validate the arguments, find the run, check its token file and memory: every start-up
    error before Ray deploys anything."""
    server_args = ServerArgs.model_validate(args) if isinstance(args, dict) else args
    policies = find_policies(server_args.resolved_output_dir(), server_args.training_key, server_args.preferences)
    read_token(server_args.auth_token_file)
    check_memory(policies, server_args.cache_size, available_memory)
    return server_args, policies


def build_app(args: dict) -> serve.Application:
    """App builder: ``serve run raypref.serve.app:build_app output_dir=outputs/soups``."""
    server_args, _ = prepare(args)
    return SoupsServer.bind(server_args.model_dump())


def serve_soups(args: dict, host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/",
                name: str = "soups", allow_remote: bool = False, deployment: dict | None = None) -> str:
    """Start Serve's HTTP proxy on ``host:port`` (loopback unless ``allow_remote``), deploy the
    app (``deployment``: Serve deployment options), and return its base URL. ``serve.shutdown()``
    stops it."""
    server_args, _ = prepare(args)
    check_bind(host, allow_remote, server_args.auth_token_file)
    serve.start(http_options={"host": host, "port": port})
    serve.run(SoupsServer.options(**(deployment or {})).bind(server_args.model_dump()), name=name,
              route_prefix=route_prefix, blocking=False)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


__all__ = ["MODEL_ID_HEADER", "SoupsServer", "ServerArgs", "build_app", "check_bind", "prepare", "serve_soups", "api"]
