"""The main job's demo assets, not library API: the embedded model (`default_model/`, a small
OLMoE-architecture checkpoint), the text it is trained and profiled on (`corpus`) and the report that
compares DeepSpeed's native layout with GRACE (`report`). scripts/main.sh, the README's snippets and the
tests use them; nothing in grace_ds imports them."""
