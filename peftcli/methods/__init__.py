"""Layer 4, methods. METHODS: the one explicit list of registered PEFT methods (adding a method = one file + one line here)."""
from __future__ import annotations

from ..errors import UserError
from . import bitfit, freeze, full, lora
from .registry import Method

# Each family keeps its own block (imports inside the block keep merges of parallel work trivial).
_SPINE = [full.METHOD, freeze.METHOD, bitfit.METHOD, lora.METHOD]
# -- reparameterised: LoRA variants, IA3, VeRA (issue 5a) --
from . import ia3, vera  # noqa: E402

_REPARAM_A: list[Method] = [ia3.METHOD, vera.METHOD]
# -- reparameterised: AdaLoRA, GLoRA, Diff Pruning, QLoRA, SVD (issue 5b) --
from . import adalora, diff_pruning, glora, qlora, svd  # noqa: E402

_REPARAM_B: list[Method] = [adalora.METHOD, glora.METHOD, diff_pruning.METHOD, qlora.METHOD, svd.METHOD]
# -- additive: bottleneck adapters and friends (issue 8) --
from . import adamix, adapter, adapter_fusion, lst, mam, parallel_adapter, unipelt  # noqa: E402

_ADDITIVE: list[Method] = [adapter.METHOD, adapter.DROP_METHOD, parallel_adapter.METHOD,
                            parallel_adapter.ADAPTFORMER, adamix.METHOD, adamix.LORA_METHOD,
                            adapter_fusion.METHOD, lst.METHOD, mam.METHOD, unipelt.METHOD]
# -- prompt methods (issue 9) --
from . import p_tuning, p_tuning_v2, prefix_tuning, prompt_tuning, trigger_tokens, vpt  # noqa: E402
from . import soft_trigger_tokens  # noqa: E402

_PROMPT: list[Method] = [prefix_tuning.METHOD, prompt_tuning.METHOD, trigger_tokens.METHOD, soft_trigger_tokens.METHOD,
                         p_tuning.METHOD, p_tuning_v2.METHOD, vpt.METHOD]
# -- selective / training-time methods (issue 7) --
from . import child_tuning, sparse  # noqa: E402

_SELECTIVE: list[Method] = [child_tuning.METHOD, sparse.METHOD]

METHODS: dict[str, Method] = {m.name: m for m in _SPINE + _REPARAM_A + _REPARAM_B + _ADDITIVE + _PROMPT + _SELECTIVE}


def get_method(name, where=None) -> Method:
    if name not in METHODS:
        from ..config.schema import did_you_mean

        message = f"unknown method {name!r}{did_you_mean(str(name), METHODS)}; registered: {', '.join(METHODS)}"
        raise where.error(message) if where else UserError(message)
    return METHODS[name]
