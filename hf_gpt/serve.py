"""`hf-gpt serve FOLDER`: an OpenAI-compatible server for a folder we wrote, with continuous batching.

Built on transformers' own serving stack (`transformers serve`: FastAPI app, handlers, continuous-batching
manager, uvicorn). Three things are ours, each for a reason:

1. `GPTModelManager` loads the folder through `AutoModelForCausalLM` (registered on `import hf_gpt`, or the
   folder's own code with `trust_remote_code`). transformers' `ModelManager._load_model` looks the class up by
   name inside the `transformers` module (`getattr(transformers, config.architectures[0])`), which fails for
   every custom-code model: "module transformers has no attribute GPTForCausalLM".
2. Request checks. transformers serve 5.24 answers HTTP 500 for a prompt longer than the context, `max_tokens`
   past it or a negative `max_tokens`; here each is a 400 with an OpenAI-style error body, given before the
   request reaches the model (errors of transformers' own checks get the same body). A prompt may also be a
   list of token ids (as in OpenAI's API), and `"return_token_ids": true` adds the generated ids to the answer
   (vLLM's extension).
3. Continuous batching starts with the server, greedy. transformers' continuous-batching manager takes its
   sampling settings (do_sample, temperature, top_p) from the first request and keeps them for every later
   one, so a server that mixed greedy and sampled requests would answer some of them with the wrong decoding.
   We fix it to greedy and refuse sampling requests with a 400; `--no-continuous-batching` serves each request
   with `generate()` (one at a time) and honours temperature and top_p.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
import signal
import sys
import time

logger = logging.getLogger("hf_gpt.serve")


class RequestError(Exception):
    """A request the server refuses: answered with `status` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def _error_body(message: str, param: str | None = None, code: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def _positive_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"`{name}` must be an integer, got {value!r}.", name)
    if value < 1:
        raise RequestError(f"`{name}` must be at least 1, got {value}.", name)
    return value


def check_lengths(prompt_len: int, max_new: int | None, n_positions: int, param: str = "max_tokens") -> int:
    """The number of tokens to generate for a prompt of `prompt_len` tokens: `max_new`, or all the room left
    in the context when it is None (as vLLM does). Raises `RequestError` when the prompt is empty or does not
    leave room for them."""
    if prompt_len == 0:
        raise RequestError("The prompt is empty: give at least one token.", "prompt")
    if prompt_len >= n_positions:
        raise RequestError(
            f"The prompt is {prompt_len} tokens; this model's context is {n_positions} tokens "
            f"(n_positions), which must hold the prompt and at least one new token.",
            "prompt",
        )
    room = n_positions - prompt_len
    if max_new is None:
        return room
    if max_new > room:
        raise RequestError(
            f"The prompt ({prompt_len} tokens) plus {param}={max_new} is {prompt_len + max_new} tokens, "
            f"past this model's context of {n_positions} (n_positions): ask for at most {room}.",
            param,
        )
    return max_new


def check_chat(
    body: dict, tokenizer, n_positions: int, messages: list[dict] | None, tools: list | None, param: str
) -> None:
    """The checks of a chat request (`/v1/chat/completions`, `/v1/responses`): the model has a chat template, and
    the prompt it renders (as transformers' handlers render it) leaves room for `body[param]` new tokens, which is
    set to the room left when absent."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise RequestError(
            "This model has no chat template (a base language model): use /v1/completions with a text prompt.",
            "messages",
        )
    max_new = _positive_int(body, param)
    try:
        rendered = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tools=tools, tokenize=True, return_dict=True
        )
    except Exception as e:  # the template's own errors (a role it does not know, ...)
        raise RequestError(f"The chat template cannot render these messages: {e}", "messages") from e
    body[param] = check_lengths(len(rendered["input_ids"]), max_new, n_positions, param)


def _check_sampling(body: dict, continuous_batching: bool) -> None:
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise RequestError(f"`{name}` must be a number, got {value!r}.", name)
    temperature, top_p = body.get("temperature"), body.get("top_p")
    if temperature is not None and temperature < 0:
        raise RequestError(f"`temperature` must be >= 0, got {temperature}.", "temperature")
    if top_p is not None and not 0 < top_p <= 1:
        raise RequestError(f"`top_p` must be in (0, 1], got {top_p}.", "top_p")
    if continuous_batching and ((temperature or 0) > 0 or (top_p is not None and top_p < 1)):
        raise RequestError(
            "This server decodes greedily (continuous batching shares one decoding setting between all "
            "requests): send temperature 0 (or none) and no top_p, or restart it with --no-continuous-batching "
            "to sample.",
            "temperature" if (temperature or 0) > 0 else "top_p",
        )


def continuous_batching_supported() -> bool:
    """Whether this transformers' paged cache takes its indices through the attention kwargs, as our model hands
    them over (transformers 5.24+; the check of tests/test_attention_interface.py)."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    return "kwargs" in inspect.signature(PagedAttentionCache.update).parameters


def _serving_classes():
    """transformers' serving classes with our changes; imported only when serving (FastAPI, uvicorn)."""
    import transformers
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.utils import Modality

    from .tokenization import load_tokenizer

    class GPTModelManager(ModelManager):
        """transformers' ModelManager, loading through the Auto classes instead of by class name."""

        def __init__(self, *args, served_name: str, **kwargs):
            self.served_name = served_name
            super().__init__(*args, **kwargs)

        def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None):
            # A folder without tokenizer files still serves with GPT-2's when its vocabulary fits.
            config = transformers.AutoConfig.from_pretrained(
                model_id_and_revision, trust_remote_code=self.trust_remote_code
            )
            tokenizer = load_tokenizer(model_id_and_revision, config)
            if tokenizer is None:
                raise ValueError(f"{model_id_and_revision} has no tokenizer, and its vocabulary is not GPT-2's.")
            return tokenizer

        def _load_model(self, model_id_and_revision: str, tqdm_class=None, progress_callback=None, gguf_file=None):
            return transformers.AutoModelForCausalLM.from_pretrained(
                model_id_and_revision,
                attn_implementation=self.attn_implementation,
                dtype=self.dtype,
                device_map=self.device,
                trust_remote_code=self.trust_remote_code,
            )

        def list_models(self, cache_dir: str | None = None) -> list[dict]:
            return [{**entry, "id": self.served_name, "owned_by": "hf_gpt"} for entry in super().list_models(cache_dir)]

    class Checks:
        """What every handler of ours does first: refuse bad requests, name the folder for the pinned model."""

        continuous_batching: bool

        def _resolve_model(self, body: dict):
            if body.get("model") in (None, self.model_manager.served_name):
                body["model"] = self.model_manager.force_model
            return super()._resolve_model(body)

        def _model(self):
            timed = next(iter(self.model_manager.loaded_models.values()))
            return timed.model, timed.processor

    class GPTCompletionHandler(Checks, CompletionHandler):
        """`/v1/completions`: transformers' handler after our checks; the prompt may be a string or token ids."""

        async def handle_request(self, body: dict, request_id: str):
            self._validate_request({k: v for k, v in body.items() if k != "return_token_ids"})
            return_token_ids = bool(body.pop("return_token_ids", False))
            model_id, model, tokenizer = self._resolve_model(body)
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                ids = tokenizer(prompt)["input_ids"]
            elif isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
                ids = list(prompt)
                bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
                if bad:
                    raise RequestError(
                        f"Token ids {bad[:5]} are outside this model's vocabulary (0 to {model.config.vocab_size - 1}).",
                        "prompt",
                    )
            else:
                raise RequestError("`prompt` must be one string or one list of token ids.", "prompt")
            max_new = check_lengths(len(ids), _positive_int(body, "max_tokens"), model.config.n_positions)
            _check_sampling(body, self.continuous_batching)
            body["max_tokens"] = max_new

            modality = self.model_manager.get_model_modality(model, processor=tokenizer)
            use_cb = self.generation_state.use_continuous_batching(model, modality)
            gen_manager = self.generation_state.get_manager(model_id, use_cb=use_cb)
            gen_config = self._build_generation_config(body, model.generation_config, use_cb=use_cb)
            if use_cb:
                gen_manager.init_cb(model, gen_config)
                inputs = {"input_ids": ids}
            else:
                import torch

                inputs = {"input_ids": torch.tensor([ids], device=model.device)}
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            suffix = body.get("suffix")
            if body.get("stream"):
                return self._streaming(request_id, model, tokenizer, model_id, inputs, gen_config, gen_manager, suffix)
            if not return_token_ids:
                return await self._non_streaming(
                    request_id, model, tokenizer, model_id, inputs, gen_config, gen_manager, suffix
                )
            return await self._with_token_ids(
                request_id, model, tokenizer, model_id, inputs, gen_config, gen_manager, ids
            )

        async def _with_token_ids(self, request_id, model, tokenizer, model_id, inputs, gen_config, gen_manager, ids):
            from fastapi.responses import JSONResponse

            text, input_len, generated = await gen_manager.generate_non_streaming(
                model, tokenizer, inputs, gen_config, request_id=request_id
            )
            generated = [int(t) for t in generated]
            finish = "length" if len(generated) >= gen_config.max_new_tokens else "stop"
            choice = {"index": 0, "text": text, "finish_reason": finish, "token_ids": generated}
            return JSONResponse(
                {
                    "id": request_id,
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": model_id,
                    "choices": [choice],
                    "prompt_token_ids": ids,
                    "usage": {
                        "prompt_tokens": input_len,
                        "completion_tokens": len(generated),
                        "total_tokens": input_len + len(generated),
                    },
                }
            )

    class GPTChatCompletionHandler(Checks, ChatCompletionHandler):
        async def handle_request(self, body: dict, request_id: str):
            self._validate_request(body)
            self._resolve_model(body)
            model, tokenizer = self._model()
            messages = self.get_processor_inputs_from_messages(body.get("messages") or [], Modality.LLM)
            param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            check_chat(body, tokenizer, model.config.n_positions, messages, body.get("tools"), param)
            _check_sampling(body, self.continuous_batching)
            return await super().handle_request(body, request_id)

    class GPTResponseHandler(Checks, ResponseHandler):
        async def handle_request(self, body: dict, request_id: str):
            self._validate_request(body)
            self._resolve_model(body)
            model, tokenizer = self._model()
            if getattr(tokenizer, "chat_template", None) is not None:
                messages = self.get_processor_inputs_from_messages(self._normalize_input(body), Modality.LLM)
                tools = self._normalize_tools(body.get("tools"))
            else:
                messages = tools = None
            check_chat(body, tokenizer, model.config.n_positions, messages, tools, "max_output_tokens")
            _check_sampling(body, self.continuous_batching)
            return await super().handle_request(body, request_id)

    return GPTModelManager, GPTCompletionHandler, GPTChatCompletionHandler, GPTResponseHandler


def build_app(
    folder: str,
    served_name: str | None = None,
    continuous_batching: bool = True,
    cb_num_blocks: int | None = None,
    cb_page_size: int | None = None,
    cb_max_batch_tokens: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """The FastAPI app of `hf-gpt serve` (transformers' `build_server` with our model manager and handlers) and
    the generation state to shut down when the server stops. Loads the model and starts continuous batching."""
    import torch
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    import hf_gpt  # noqa: F401  (registers GPTConfig / GPTForCausalLM with the Auto classes)

    GPTModelManager, GPTCompletionHandler, GPTChatCompletionHandler, GPTResponseHandler = _serving_classes()
    options = {"device": device, "dtype": dtype, "trust_remote_code": trust_remote_code, "force_model": folder}
    if "continuous_batching" in inspect.signature(ModelManager.__init__).parameters:  # transformers 5.24+
        options["continuous_batching"] = continuous_batching
    manager = GPTModelManager(served_name=served_name or folder, **options)
    model = next(iter(manager.loaded_models.values())).model
    n_positions = model.config.n_positions

    cb_config = None
    if continuous_batching:
        page_size = cb_page_size or min(256, n_positions)
        # transformers sizes the paged cache from free accelerator memory, which on CPU is 90% of the machine's
        # RAM: there, default to room for 32 full-context sequences instead.
        on_cpu = model.device.type == "cpu"
        num_blocks = cb_num_blocks or (math.ceil(32 * n_positions / page_size) if on_cpu else None)
        max_batch_tokens = cb_max_batch_tokens or (max(256, n_positions) if on_cpu else None)
        cb_config = ContinuousBatchingConfig(
            page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens
        )
    state = GenerationState(continuous_batching=continuous_batching, cb_config=cb_config)
    handlers = {}
    for name, cls in [
        ("chat_handler", GPTChatCompletionHandler),
        ("completion_handler", GPTCompletionHandler),
        ("response_handler", GPTResponseHandler),
    ]:
        handlers[name] = cls(model_manager=manager, generation_state=state)
        handlers[name].continuous_batching = continuous_batching
    handlers["transcription_handler"] = TranscriptionHandler(manager, state)
    if "systemone_handler" in inspect.signature(build_server).parameters:  # transformers 5.24+
        from transformers.cli.serving.systemone import SystemOneHandler

        handlers["systemone_handler"] = SystemOneHandler(model_manager=manager, generation_state=state)
    app = build_server(manager, generation_state=state, **handlers)

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError):
        return JSONResponse(_error_body(exc.message, exc.param), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        # transformers' handlers raise HTTPException (FastAPI's body: {"detail": ...}); answer as OpenAI does.
        return JSONResponse(_error_body(str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_request: Request, exc: RequestValidationError):
        # FastAPI answers a body that is not a JSON object with 422 and a list of pydantic errors.
        details = "; ".join(str(e.get("msg", e)) for e in exc.errors())
        return JSONResponse(_error_body(f"The request body is not a JSON object: {details}"), status_code=400)

    if continuous_batching:
        # Start the batching worker now, greedy (see the module docstring), so the first request does not pay for
        # it and does not choose the decoding for everyone.
        greedy = GenerationConfig.from_dict(model.generation_config.to_dict())
        greedy.do_sample, greedy.temperature, greedy.top_p, greedy.top_k = False, None, None, None
        greedy.use_cache = False
        state.get_manager(manager.process_model_name(folder), use_cb=True).init_cb(model, greedy)
    torch.set_grad_enabled(False)
    return app, state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="hf-gpt serve",
        description="Serve a model folder over an OpenAI-compatible API (/v1/completions, /v1/models, /health; "
        "/v1/chat/completions for models with a chat template), with continuous batching. Built on "
        "transformers serve.",
    )
    p.add_argument("folder", metavar="FOLDER", help="a folder written by save_pretrained (model and tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    p.add_argument("--served-model-name", help="the model name clients send (default: FOLDER as given)")
    p.add_argument(
        "--no-continuous-batching",
        action="store_true",
        help="serve each request with generate(), one at a time (allows temperature / top_p sampling)",
    )
    p.add_argument("--cb-num-blocks", type=int, help="paged-cache blocks (default on CPU: 32 full contexts)")
    p.add_argument("--cb-page-size", type=int, help="tokens per cache page (default: min(256, n_positions))")
    p.add_argument("--cb-max-batch-tokens", type=int, help="tokens per batch step (default on CPU: 256)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda:0', ... (default auto)")
    p.add_argument("--dtype", default="auto", help="'auto' (the weights' dtype), 'float32', 'bfloat16', ...")
    p.add_argument("--trust-remote-code", action="store_true", help="load with the folder's own code")
    p.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    args = p.parse_args(argv)

    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        print('hf-gpt serve needs FastAPI, uvicorn and openai: pip install "transformers[serving]"', file=sys.stderr)
        return 1
    if not os.path.isdir(args.folder):
        print(f"hf-gpt serve: {args.folder}: no such folder", file=sys.stderr)
        return 1
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    continuous_batching = not args.no_continuous_batching
    if continuous_batching and not continuous_batching_supported():
        logger.warning("this transformers' paged cache cannot run our model (5.24+ can): serving with generate()")
        continuous_batching = False
    app, state = build_app(
        args.folder,
        served_name=args.served_model_name,
        continuous_batching=continuous_batching,
        cb_num_blocks=args.cb_num_blocks,
        cb_page_size=args.cb_page_size,
        cb_max_batch_tokens=args.cb_max_batch_tokens,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))

    # uvicorn shuts down gracefully on SIGINT / SIGTERM (open requests are answered), then restores the handlers it
    # found and raises the signal again: with Python's defaults the process would die by SIGTERM before stopping the
    # batching worker, or print a KeyboardInterrupt traceback for Ctrl-C. With these handlers found, it returns.
    def stopped(sig: int, _frame) -> None:
        logger.info("hf-gpt serve: stopped by %s", signal.Signals(sig).name)

    previous = {sig: signal.signal(sig, stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        state.shutdown()  # stops the continuous-batching worker thread
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


__all__ = ["RequestError", "build_app", "check_chat", "check_lengths", "main"]

if __name__ == "__main__":
    sys.exit(main())
