"""airmoe inside other frameworks. :mod:`airmoe.integrations.transformers`:
Hugging Face transformers MoE models with AIR routing (imports transformers
only when it is used)."""
