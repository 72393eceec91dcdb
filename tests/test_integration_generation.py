"""Real generation: SmolLM2-135M (the PyPI package) trained briefly on real E2E and WebNLG data, then
both adapters served from one causal LM in one mixed batch."""

import json
import os
from pathlib import Path

import pytest

from adamix_zoo.recipes.generation import GenerationArgs, run_generation
from adamix_zoo.serving import ServingEngine

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ADAMIX_DATA_DIR", ROOT.parent / "shared" / "data"))
NEW_TOKENS = 12


def short_run(tmp_path: Path, task: str, method: str, seed: int) -> tuple[Path, list[dict]]:
    out = tmp_path / task
    final = run_generation(GenerationArgs(
        task=task, method=method, seed=seed, data_dir=str(DATA), output_dir=str(out),
        train_size=24, eval_size=3, steps=3, batch_size=4, max_new_tokens=NEW_TOKENS))
    assert 0.0 <= final["bleu"] <= 100.0
    generations = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    return out / "merged", generations


@pytest.mark.skipif(not (DATA / "e2e").is_dir(), reason="needs ../shared/data/e2e and webnlg")
def test_smollm2_serves_e2e_and_webnlg_adapters_in_one_batch(tmp_path):
    e2e, e2e_out = short_run(tmp_path, "e2e", "adamix-lora", seed=0)
    webnlg, webnlg_out = short_run(tmp_path, "webnlg", "lora", seed=1)
    engine = ServingEngine.from_pretrained("smollm2-135m", device="cpu", lm=True)
    engine.attach(e2e)
    engine.attach(webnlg)
    assert {t.task: t.problem for t in engine.tasks()} == {"e2e": "lm", "webnlg": "lm"}
    rows = [("e2e", g["source"]) for g in e2e_out] + [("webnlg", g["source"]) for g in webnlg_out]
    rows.insert(2, (None, "The capital of France is"))  # the backbone alone, mid-batch
    outputs = engine.generate([t for t, _ in rows], [s for _, s in rows], max_new_tokens=NEW_TOKENS)
    served = {(t, s): o for (t, s), o in zip(rows, outputs)}
    # each task's rows get what its run generated alone with the AdaMix model it trained
    assert [served[("e2e", g["source"])] for g in e2e_out] == [g["output"] for g in e2e_out]
    assert [served[("webnlg", g["source"])] for g in webnlg_out] == [g["output"] for g in webnlg_out]
    assert served[(None, "The capital of France is")]  # the bare backbone continues the text
