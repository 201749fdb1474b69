"""Parameter selection for fine-tuning the shrunken encoder: full, BitFit, LoRA, prompt and
prefix tuning (peft) and bottleneck adapters, plus saving the result so
`TextEncoder.from_pretrained` loads it."""
from __future__ import annotations

from pathlib import Path

import torch

METHODS = ("full", "bitfit", "lora", "adapter", "prompt", "prefix")
ADAPTER_FILE = "adapters.pt"
PROMPT_DIR = "prompt"  # peft prompt/prefix weights beside the (unchanged) base model


class BottleneckAdapter(torch.nn.Module):
    """Houlsby-style adapter: x + up(relu(down(x))); `up` starts at zero, so an untrained
    adapter leaves the encoder unchanged."""

    def __init__(self, dim: int, bottleneck: int = 32) -> None:
        super().__init__()
        self.down = torch.nn.Linear(dim, bottleneck)
        self.up = torch.nn.Linear(bottleneck, dim)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(torch.relu(self.down(hidden)))


class AdaptedLinear(torch.nn.Module):
    """A frozen linear layer followed by an adapter (placed after each layer's FFN output)."""

    def __init__(self, linear: torch.nn.Linear, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.linear, self.adapter = linear, adapter

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.linear(hidden))


def add_adapters(model: torch.nn.Module, bottleneck: int = 32) -> list[BottleneckAdapter]:
    """Insert one adapter after the output projection of every transformer layer."""
    adapters = []
    for layer in model.encoder.layer:
        adapter = BottleneckAdapter(layer.output.dense.out_features, bottleneck).to(
            layer.output.dense.weight.device)
        layer.output.dense = AdaptedLinear(layer.output.dense, adapter)
        adapters.append(adapter)
    model.config.adapter_bottleneck = bottleneck
    return adapters


def prepare(model: torch.nn.Module, method: str, lora_rank: int = 8,
            adapter_bottleneck: int = 32, virtual_tokens: int = 16) -> torch.nn.Module:
    """Return the module to train with only the method's parameters trainable."""
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method '{method}' ({', '.join(METHODS)})")
    if method == "full":
        for parameter in model.parameters():
            parameter.requires_grad = True
        return model
    for parameter in model.parameters():
        parameter.requires_grad = False
    if method == "bitfit":
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.endswith(".bias")
        return model
    if method == "adapter":
        for adapter in add_adapters(model, adapter_bottleneck):
            for parameter in adapter.parameters():
                parameter.requires_grad = True
        return model
    from peft import (LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType,
                      get_peft_model)

    if method == "prompt":  # soft tokens prepended to the input, started from real words
        config = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION,
                                    num_virtual_tokens=virtual_tokens,
                                    prompt_tuning_init="SAMPLE_VOCAB")
    elif method == "prefix":  # learned keys/values in every layer, started near a no-op
        config = PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION,
                                    num_virtual_tokens=virtual_tokens, init_weights="zero")
    else:
        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                            target_modules=["query", "value"], lora_dropout=0.0)
    return get_peft_model(model, config)


def finished(trained: torch.nn.Module, method: str) -> torch.nn.Module:
    """The model to save: LoRA merged into the base weights; prompt and prefix tuning cannot
    be merged, so they stay a peft model (saved as base + PROMPT_DIR)."""
    return trained.merge_and_unload() if method == "lora" else trained


def load_prompt(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder / PROMPT_DIR))


def is_prompt_model(model: torch.nn.Module) -> bool:
    return getattr(model, "active_peft_config", None) is not None \
        and model.active_peft_config.is_prompt_learning


def count_parameters(module: torch.nn.Module) -> dict[str, int]:
    return {"trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in module.parameters())}


def save_adapters(model: torch.nn.Module, folder: Path) -> None:
    """Adapters are not part of the stock architecture: their weights go beside it, and the
    wrapped linear layers are saved unwrapped so the folder stays a standard model."""
    adapters = {}
    for index, layer in enumerate(model.encoder.layer):
        if isinstance(layer.output.dense, AdaptedLinear):
            adapters[index] = layer.output.dense.adapter.state_dict()
    torch.save({"bottleneck": model.config.adapter_bottleneck, "adapters": adapters},
               folder / ADAPTER_FILE)


def unwrap_adapters(model: torch.nn.Module) -> list[AdaptedLinear]:
    wrapped = []
    for layer in model.encoder.layer:
        if isinstance(layer.output.dense, AdaptedLinear):
            wrapped.append(layer.output.dense)
            layer.output.dense = layer.output.dense.linear
    return wrapped


def rewrap_adapters(model: torch.nn.Module, wrapped: list[AdaptedLinear]) -> None:
    for layer, module in zip(model.encoder.layer, wrapped):
        layer.output.dense = module


def load_adapters(model: torch.nn.Module, folder: Path) -> None:
    saved = torch.load(folder / ADAPTER_FILE, weights_only=True)
    adapters = add_adapters(model, saved["bottleneck"])
    for index, state in saved["adapters"].items():
        adapters[int(index)].load_state_dict(state)
