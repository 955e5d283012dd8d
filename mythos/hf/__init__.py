"""Mythos in the Hugging Face ecosystem (the [hf] extra): MythosConfig, MythosForCausalLM, the byte tokenizer as a
tokenizer.json, the model card, `mythos export hf` (docs/huggingface.md).

    >>> import mythos.hf                                   # registers model_type "mythos" with the Auto classes
    >>> model = mythos.hf.MythosForCausalLM.from_twin(mythos_torch.build(s, seed=0))
    >>> model.save_pretrained("out/m")                     # or: mythos.hf.export_hf("tiny", "out/m")
    >>> AutoModelForCausalLM.from_pretrained("out/m")      # here; trust_remote_code=True in a process without mythos.hf

Importing it loads torch and transformers (never on `import mythos`).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_mythos import MythosConfig
from .export import HFExportInfo, export_hf
from .hub_mythos import eval_metrics, model_card, spec_summary, tokenizer_files
from .modeling_mythos import MythosCache, MythosCausalLMOutput, MythosForCausalLM, causal_lm_loss

AutoConfig.register(MythosConfig.model_type, MythosConfig, exist_ok=True)
AutoModelForCausalLM.register(MythosConfig, MythosForCausalLM, exist_ok=True)

__all__ = [
    "MythosConfig", "MythosForCausalLM", "MythosCache", "MythosCausalLMOutput", "causal_lm_loss",
    "tokenizer_files", "model_card", "spec_summary", "eval_metrics", "export_hf", "HFExportInfo",
]
