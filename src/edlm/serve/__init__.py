"""An OpenAI-compatible HTTP server for a converted model: ``edlm serve``.

One process, two sides::

    HTTP handlers (asyncio event loop)          Engine worker thread (owns the model, torch.no_grad)
    ----------------------------------          -----------------------------------------------------
    tokenize, check limits, build the job  -->  waiting deque (bounded by max_queue; full -> HTTP 429)
                                                  | at every block boundary, waiting jobs are admitted as
                                                  | cohorts: same DecodeConfig, <= max_batch rows each
                                                  v
                                                active cohorts, one ``iter_steps`` generator each,
                                                advanced round-robin one block at a time
    asyncio.Queue per job                  <--  token ids of each finished block, then "done"
    (loop.call_soon_threadsafe)
    detokenize, stop strings, SSE chunks
    or one JSON body

The worker knows only token ids; text lives in the handlers. A stop string or a client that goes away cancels the
row through ``should_stop``, so its slot is free at the next block boundary. Rows batch freely: padding never
changes a row's result in this decoder, and each row samples from its own generator seeded with its request's seed,
so a seed gives the same text whoever else is being served.

Modules: ``settings`` (:class:`ServeSettings`, holding the server-wide :class:`~edlm.config.DecodeConfig`),
``protocol`` (request schemas, response bodies from the ``openai`` types, errors), ``engine`` (the cohort
scheduler), ``app`` (the FastAPI app, SSE, :func:`serve`, :class:`ServerThread`). The load test that drives a
server lives in :mod:`edlm.bench.load`.
"""

from edlm.serve.app import ServerThread, create_app, serve
from edlm.serve.engine import (
    DoneEvent,
    Engine,
    EngineStoppedError,
    ErrorEvent,
    Event,
    Job,
    QueueFullError,
    TokensEvent,
)
from edlm.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    StreamOptions,
    error_response,
)
from edlm.serve.settings import ServeSettings, load_serve_settings

__all__ = [
    "ApiError", "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "ContentPart", "DoneEvent", "Engine",
    "EngineStoppedError", "ErrorEvent", "Event", "Job", "QueueFullError", "ServeSettings", "ServerThread",
    "StreamOptions", "TokensEvent", "create_app", "error_response", "load_serve_settings", "serve",
]
