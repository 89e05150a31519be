"""Text LLM backends for data generation (``register_llm_backends``): the ``transformers`` backend runs
a local causal LM, ``openai_compatible`` calls any server that speaks the OpenAI chat-completions API."""
