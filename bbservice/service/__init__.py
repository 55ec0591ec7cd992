"""The BentoML service: captions and music over HTTP (``bbservice.service:BBService``).

Endpoints (all ``POST``, ``/models`` also ``GET``; BentoML adds ``GET /livez``, ``/readyz``,
``/metrics`` — with the project's metrics, :mod:`bbservice.service_metrics` — and the OpenAPI
page at ``/``)::

    /caption        multipart: image file + decoding parameters      -> JSON captions
    /generate       JSON or multipart (optional primer MIDI file)    -> audio/midi file
    /generate_json  same parameters as /generate                     -> JSON notes + PNG rolls
    /models         (no body)                                        -> what is loaded

``mode="mean"`` (default) runs the exported mean-gate graphs on ONNX Runtime
(:mod:`bbservice.runtime`); ``mode="stochastic"`` runs the PyTorch model with sampled gates
(torch is imported only then) and needs the training checkpoint next to the export.

Models come from BentoML's model store (``bbservice-music:latest``,
``bbservice-caption:latest``, written by ``bbservice export``) unless an environment variable
points at an export folder (:mod:`.settings` lists them all).

Readiness: ``/readyz`` answers 503 until a warm-up inference of every model has passed (run in
a background thread, so ``/livez`` answers at once); a model that fails to load or to warm up
keeps the service unready and ``/models`` says why. Every response echoes the model's content
hash, the decoding parameters and the seed; the same request gives the same answer.

The package::

    app.py        the endpoints: validate, call a slot, shape the answer
    settings.py   limits and the BBSERVICE_* environment variables
    http.py       one error shape, the endpoints' error glue, the ASGI request guard, GET /models
    slots.py      model slots: export + PyTorch twin, warm-up, running the models
    batching.py   adaptive batching of caption requests
    answers.py    the JSON bodies (caption items, music outputs, /models)
    schemas.py    the OpenAPI response shapes
"""

from bbservice.service.app import BBService

__all__ = ["BBService"]
