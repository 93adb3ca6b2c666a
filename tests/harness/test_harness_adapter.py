"""The lm-evaluation-harness adapter (lm-eval comes with the 'dev' and 'evals' extras; without it
these tests fail, they are never skipped)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.harness


def test_offline_tasks_through_the_harness(tmp_path, capsys):
    import lm_eval  # noqa: F401  (fails loudly when the extra is missing)

    from ankus.cli import main

    out = tmp_path / "h"
    assert main(["eval", "harness", "--model", "tiny-llama", "--tasks", "ankus_implicature,ankus_implicature_gen",
                 "--limit", "4", "--out", str(out)]) == 0
    table = (out / "table.csv").read_text()
    assert "ankus_implicature,acc" in table and "ankus_implicature_gen,exact_match" in table


def test_adapter_requests_and_guidance(monkeypatch):
    from lm_eval.api.instance import Instance

    from ankus.evals.harness import AnkusLM

    lm = AnkusLM("tiny-llama", guidance_scale=2.0, negative_prompt="Say anything.")
    req = lambda args, kind: Instance(request_type=kind, doc={}, arguments=args, idx=0)  # noqa: E731
    ll = lm.loglikelihood([req(("Is it?", " yes"), "loglikelihood")])
    assert ll == lm.lm.score(["Is it?"], [" yes"])
    (rolling,) = lm.loglikelihood_rolling([req(("some text here",), "loglikelihood_rolling")])
    assert rolling < 0
    seen = {}
    orig = lm.lm.generate

    def spy(prompts, **kw):
        seen.update(kw)
        return orig(prompts, **kw)

    monkeypatch.setattr(lm.lm, "generate", spy)
    (text,) = lm.generate_until([req(("Hello", {"until": ["\n"], "max_gen_toks": 3}), "generate_until")])
    assert isinstance(text, str) and "\n" not in text
    assert seen["guidance_scale"] == 2.0 and seen["negative_prompts"] == ["Say anything."] and seen["max_new_tokens"] == 3
