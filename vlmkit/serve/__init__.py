"""``recipes serve``: a trained model behind a web chat (Gradio) and an OpenAI-compatible API
(``/v1/chat/completions``), in one process, one model, one generation at a time.

- :mod:`~vlmkit.serve.limits`: the server's limits (images, text, queue) as a pydantic config;
- :mod:`~vlmkit.serve.inputs`: guarded image decoding (size, pixel count, not-an-image);
- :mod:`~vlmkit.serve.worker`: the model, its bounded queue and token-by-token streaming;
- :mod:`~vlmkit.serve.openai_api`: the API's request models and routes;
- :mod:`~vlmkit.serve.card`: the model card (recipe, components, stages, last evaluation);
- :mod:`~vlmkit.serve.web`: the Gradio app;
- :mod:`~vlmkit.serve.server`: both on one FastAPI app, run by uvicorn.

Prompts are built by :class:`vlmkit.core.chat.Chat` (what ``recipes chat`` uses) and answers come
from :func:`vlmkit.core.evaluation.generation.generate`, so a greedy answer here equals
``recipes chat``'s and ``vlmkit.load(...)``'s for the same input.
"""
