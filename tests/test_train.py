"""curate train / eval / compare on CPU with the bundled SmolLM2: a real TRL SFTTrainer with a real
PEFT LoRA adapter on a tiny real export, the adapter loaded back and scored, a real pairwise judge,
and the compare flow as real Prefect flow runs (two selections × one budget, 2-step trains)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT, write_flow
from curate.config import load_flow
from curate.errors import ConfigError
from curate.pipeline import execute

pytest.importorskip("trl")
pytest.importorskip("peft")

EVAL_SET = {"path": str(ROOT / "data" / "eval" / "alpaca_eval_40.json")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A curation run over short real rows (single- and multi-turn), exported as messages and prompt_completion."""
    d = tmp_path_factory.mktemp("train")
    flow = write_flow(d, name="train-src", base_dir=str(ROOT), output_dir=str(d / "out"), store_dir=str(d / "store"),
                      inputs=[{"path": "data/sample/cherry_alpaca.jsonl", "limit": 12},
                              {"path": str(FIXTURES / "mt_bench_two_turn.jsonl"), "limit": 2}],
                      score=[{"method": "heuristic"}],
                      select=[{"method": "threshold", "score": "heuristic.response_tokens", "max": 400},
                              {"method": "threshold", "score": "heuristic.prompt_tokens", "max": 150}],
                      export={"layouts": ["messages", "prompt_completion"], "file_types": ["jsonl"], "max_length": 768},
                      report={"plots": False})
    summary = execute(load_flow(flow))
    assert summary["counts"]["selected"] >= 5
    return d / "out"


@pytest.fixture(scope="module")
def small_run(run_dir, tmp_path_factory):
    """The four shortest rows of the same pool: a CPU can take several optimizer steps over all of them."""
    d = tmp_path_factory.mktemp("small")
    src = load_flow(run_dir.parent / "train-src.yaml")
    flow = write_flow(d, name="small", base_dir=str(ROOT), output_dir=str(d / "out"), store_dir=str(src.store),
                      inputs=[i.model_dump(exclude_none=True) for i in src.inputs], score=[{"method": "heuristic"}],
                      select=[{"method": "top_k", "score": "heuristic.response_tokens", "budget": 4, "descending": False}],
                      export={"layouts": ["messages", "prompt_completion"], "file_types": ["jsonl"], "max_length": 256},
                      report={"plots": False})
    assert execute(load_flow(flow))["counts"]["selected"] == 4
    return d / "out"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- configuration ---------------------------------------------------------------------------------


def test_train_config_is_validated(run_dir, tmp_path):
    from pydantic import ValidationError

    from curate.train import TrainSpec, locate_export, train

    with pytest.raises(ValidationError):
        TrainSpec(lora={"rank": 8})  # unknown key
    with pytest.raises(ValidationError):
        TrainSpec(method="qlora")
    assert TrainSpec().lr == 2e-4 and TrainSpec(method="full").lr == 2e-5
    a, b = TrainSpec(), TrainSpec(device="cuda", torch_threads=4)
    assert a.key("x") == b.key("x") != a.key("y") != TrainSpec(epochs=1).key("y")  # how it runs is not what it computes
    with pytest.raises(ConfigError, match="no alpaca jsonl file"):
        locate_export(run_dir, "alpaca")
    with pytest.raises(ConfigError, match="no export here"):
        locate_export(tmp_path, "messages")
    with pytest.raises(ConfigError, match="neither a named template"):
        train(TrainSpec(layout="messages", chat_template="no-such-template"), run_dir, tmp_path / "t")


def test_flow_train_section_and_compare_file_errors(tmp_path):
    from curate.compare import load_compare

    flow = write_flow(tmp_path, name="f", inputs=[{"path": str(ROOT / "data/sample/cherry_alpaca.jsonl")}],
                      train={"epochs": 1, "lora": {"r": 4}}, export={"layouts": ["messages", "prompt_completion"]})
    spec = load_flow(flow)
    assert spec.train.lora.r == 4
    plain = load_flow(flow, ["train=null"])
    assert plain.fingerprint() == spec.fingerprint()  # training settings do not change what curation computes
    with pytest.raises(ConfigError, match=r"f\.yaml:\d+: train\.epochs"):
        load_flow(flow, ["train.epochs=0"])
    with pytest.raises(ConfigError, match="train reads the messages jsonl export: add 'messages' to export.layouts"):
        load_flow(flow, ["export.layouts=[prompt_completion]"])
    bad = tmp_path / "c.yaml"
    bad.write_text("name: c\nflow: f.yaml\nbudgets: [5]\nselections:\n  - name: r\n    select: [{method: random, budget: 5}]\n"
                   "eval:\n  eval_set: {path: x.json}\n  judge: {mode: vibes}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:9: eval\.judge\.mode"):
        load_compare(bad)


# -- the real consumer: TRL's SFTTrainer on our files ---------------------------------------------


def expected_loss_mask(tok, messages: list[dict], only_last: bool) -> tuple[list[int], list[bool]]:
    """The row rendered by the training template, its tokens, and for each token whether it lies in an
    assistant reply or the end-of-turn token after it (with ``only_last``: the final reply to the end)."""
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, at = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        start = text.index("<|im_start|>assistant\n" + m["content"] + "<|im_end|>", at) + len("<|im_start|>assistant\n")
        at = start + len(m["content"]) + len("<|im_end|>")
        spans.append((start, at))
    if only_last:  # TRL's completion-only loss: the whole completion text, its trailing newline included
        spans = [(spans[-1][0], len(text))]
    mask = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


@pytest.mark.parametrize("setup", ["default", "prompt_completion", "chatml"])
def test_loss_is_on_assistant_tokens_only(setup, run_dir, tmp_path):
    """Token by token, the tokens TRL leaves unmasked are exactly the assistant replies (+ end of
    turn): by default (messages, SmolLM2's own template with generation markers: ``smollm2``) and with
    ``chatml``, every reply of a multi-turn row and no user or system token (SmolLM2's default system
    prompt included); with ``prompt_completion``, the final reply only."""
    from curate.train import TrainSpec, locate_export
    from curate.train.sft import prepare

    spec = {"default": TrainSpec(max_steps=1), "prompt_completion": TrainSpec(layout="prompt_completion", max_steps=1),
            "chatml": TrainSpec(chat_template="chatml", max_steps=1)}[setup]
    export = locate_export(run_dir, spec.layout)
    prep = prepare(spec, export, tmp_path)
    tok = prep.tokenizer
    rows = {r["id"]: r for r in rows_of(export.path)}
    ds = prep.trainer.train_dataset
    assert len(ds) == len(rows) == export.n_rows  # nothing dropped or truncated away
    multi = default_system = 0
    for r in ds:
        src = rows[r["id"]]
        messages = src["messages"] if "messages" in src else src["prompt"] + src["completion"]
        ids, mask = expected_loss_mask(tok, messages, only_last=setup == "prompt_completion")
        assert list(r["input_ids"]) == ids
        assert [lab != -100 for lab in r["labels"]] == mask  # every token: trained iff inside an assistant reply
        assert all(lab == t for t, lab in zip(r["input_ids"], r["labels"]) if lab != -100)
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        trained = tok.decode([t for t, lab in zip(r["input_ids"], r["labels"]) if lab != -100])
        if setup == "prompt_completion":
            assert trained == replies[-1] + "<|im_end|>\n"
        else:
            assert trained == "".join(c + "<|im_end|>" for c in replies)
            multi += len(replies) > 1
        default_system += "You are a helpful AI assistant named SmolLM" in tok.decode(r["input_ids"])
    assert setup == "prompt_completion" or multi >= 1  # a multi-turn row had every reply trained
    assert default_system == (0 if setup == "chatml" else len(ds))  # SmolLM2's own text; ChatML adds no system prompt
    sources = {"default": "model-equivalent:smollm2", "prompt_completion": "model", "chatml": "named:chatml"}
    assert tok.curate_template_source == sources[setup]
    # the trainer's own batches (collator, padding) keep exactly those label tokens
    batches = list(prep.trainer.get_train_dataloader())
    assert sum(int(b["input_ids"].shape[0]) for b in batches) == len(ds)
    assert sum(int((b["labels"] != -100).sum()) for b in batches) == sum(sum(lab != -100 for lab in r["labels"]) for r in ds)


def test_training_template_choice(run_dir, tmp_path):
    """Which template a run trains with, chosen before any weights load."""
    from transformers import AutoTokenizer

    from curate.models import resolve_model
    from curate.train import TrainSpec, train
    from curate.train.chat_templates import CHATML, SMOLLM2, end_of_turn_id, renders_same, training_template

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").location)
    own = tok.chat_template
    assert "{% generation %}" not in own
    assert renders_same(tok, SMOLLM2, own) and not renders_same(tok, CHATML, own)  # ChatML drops the default system prompt
    assert training_template(tok, None, "messages", "m") == (SMOLLM2, "model-equivalent:smollm2")
    assert training_template(tok, None, "prompt_completion", "m") == (own, "model")
    assert training_template(tok, "chatml", "messages", "m") == (CHATML, "named:chatml")
    assert end_of_turn_id(tok, SMOLLM2) == end_of_turn_id(tok, CHATML) == tok.convert_tokens_to_ids("<|im_end|>")
    plain = tmp_path / "plain.jinja"
    plain.write_text(own)
    with pytest.raises(ConfigError, match="has none"):  # an explicit template without markers cannot train every reply
        train(TrainSpec(chat_template=str(plain)), run_dir, tmp_path / "t")
    other = tmp_path / "other.jinja"
    other.write_text(own.replace("<|im_end|>", "<|endoftext|>"))
    tok.chat_template = other.read_text()
    with pytest.raises(ConfigError, match="none of ours"):
        training_template(tok, None, "messages", "m")


def test_train_lowers_loss_and_the_adapter_loads_back(small_run, tmp_path):
    from curate.evaluate import EvalSpec, evaluate
    from curate.train import TrainSpec, train

    spec = TrainSpec(max_steps=4, learning_rate=1e-3, batch_tokens=1_000_000, max_length=64, lora={"r": 8, "alpha": 16})
    rec = train(spec, small_run)
    assert rec["status"] == "done" and rec["steps"] == 4
    assert rec["batch"]["rows_per_step"] == rec["export"]["n_rows"]  # batch_tokens above the data: every row in each step
    assert rec["last_loss"] < rec["first_loss"]
    assert len(rec["loss_curve"]) == 4 and all(c["loss"] > 0 for c in rec["loss_curve"])
    files = json.loads((small_run / "export" / "manifest.json").read_text())["files"]
    assert rec["versions"]["trl"] and rec["versions"]["peft"]
    assert rec["export"]["layout"] == "messages" and rec["chat_template"] == "model-equivalent:smollm2"  # the default: every reply
    assert rec["export"]["sha256"] == next(f["sha256"] for f in files if f["layout"] == "messages" and f["file_type"] == "jsonl")
    # tokens: every row in each of the 4 steps, no padding counted; tokens/s over this process's training seconds
    # (two rows' prompts, with SmolLM2's default system prompt, fill max_length: TRL drops them, the record says so)
    assert rec["rows_trained"] == 2 and not rec["resumed"]
    assert rec["tokens_trained"] == rec["tokens_this_run"] == 4 * 2 * 64
    assert rec["tokens_per_s"] == pytest.approx(rec["tokens_trained"] / rec["train_seconds"])
    weights = Path(rec["weights"])
    assert (weights / "adapter_config.json").exists() and (weights.parent / "loss.png").stat().st_size > 0
    assert not (weights.parent / "checkpoints").exists()
    assert json.loads((weights / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m-instruct"
    again = train(spec, small_run)  # the same config and data: read back, not trained again
    assert again == json.loads((weights.parent / "train.json").read_text()) and again["seconds"] == rec["seconds"]

    # the adapter loads onto its base and scores: lower held-out loss than the base on what it learned
    on_train = EvalSpec(eval_set={"path": str(small_run / "export" / "messages" / "curated_messages.jsonl")}, judge=None, max_length=128)
    tuned = evaluate(str(weights), on_train, tmp_path / "tuned")
    base = evaluate("smollm2-135m-instruct", on_train, tmp_path / "base")
    assert tuned["loss"]["n_tokens"] == base["loss"]["n_tokens"] > 0
    assert tuned["loss"]["loss"] < base["loss"]["loss"]


def test_full_fine_tuning_on_the_parquet_export(small_run, tmp_path):
    """method: full on the Parquet file (another real path): the weights dir is a whole model that curate
    loads as a local model, and its key file keeps two trainings into one folder apart."""
    import datasets  # noqa: F401

    from curate.models import model_revision
    from curate.train import TrainSpec, train

    flow = load_flow(small_run.parent / "small.yaml", ["export.file_types=[jsonl, parquet]"])
    execute(flow)
    spec = TrainSpec(method="full", file_type="parquet", max_steps=1, max_length=64, batch_tokens=256)
    rec = train(spec, small_run, tmp_path / "full")
    weights = Path(rec["weights"])
    assert rec["steps"] == 1 and rec["export"]["file"].endswith(".parquet") and weights.name == "model"
    assert (weights / "config.json").exists() and (weights / "model.safetensors").exists() and not (weights / "adapter_config.json").exists()
    first = model_revision(str(weights))
    other = train(spec.model_copy(update={"learning_rate": 1e-6}), small_run, tmp_path / "full")
    assert other["key"] != rec["key"] and model_revision(str(weights)) != first  # same folder, same sizes, another model


def test_same_seed_same_adapter_other_seed_other_init(small_run, tmp_path):
    """Two trainings with one config and seed write byte-identical adapters; seed 1 starts from other
    LoRA weights (lora_A uncorrelated with seed 0's)."""
    import numpy as np
    from safetensors.numpy import load_file

    from curate.train import TrainSpec, locate_export, train
    from curate.train.sft import prepare

    spec = TrainSpec(max_steps=1, max_length=64, batch_tokens=256, lora={"r": 4, "alpha": 8})
    a, b = train(spec, small_run, tmp_path / "a"), train(spec, small_run, tmp_path / "b")
    fa, fb = (Path(r["weights"]) / "adapter_model.safetensors" for r in (a, b))
    assert a["key"] == b["key"] and fa.read_bytes() == fb.read_bytes()
    assert any("lora_A" in k for k in load_file(str(fa)))

    def init(seed: int, where: str) -> dict:
        """The LoRA A matrices as the trainer starts from them under this seed."""
        prep = prepare(spec.model_copy(update={"seed": seed}), locate_export(small_run, spec.layout), tmp_path / where)
        return {k: p.detach().numpy().copy() for k, p in prep.trainer.model.named_parameters() if "lora_A" in k}

    first, again, other = init(0, "c"), init(0, "d"), init(1, "e")
    assert sorted(first) == sorted(other) and len(first) > 100
    x, y, z = (np.concatenate([m[k].ravel() for k in sorted(first)]) for m in (first, again, other))
    assert x.std() > 0 and np.array_equal(x, y)  # the same seed: the same start
    assert abs(np.corrcoef(x, z)[0, 1]) < 0.05  # seed 1: other LoRA weights


def test_eval_split_and_early_option_errors(small_run, tmp_path):
    """eval_fraction holds rows out by seed; their loss is recorded at eval_steps (and drawn). Options
    that cannot work here fail before any weights load, naming the fix."""
    import importlib.util

    import datasets

    from curate.errors import CurateError
    from curate.train import TrainSpec, locate_export, train
    from curate.train.sft import split_eval

    for name in ("tensorboard", "wandb"):
        if importlib.util.find_spec(name) is None:
            with pytest.raises(ConfigError, match=f"pip install {name}"):
                train(TrainSpec(report_to=name), small_run, tmp_path / "t")
    with pytest.raises(ConfigError, match="padding_free without packing"):
        train(TrainSpec(padding_free=True), small_run, tmp_path / "t")
    with pytest.raises(ConfigError, match="GPU runs with flash attention; the device here is cpu"):
        train(TrainSpec(packing=True, device="cpu"), small_run, tmp_path / "t")
    with pytest.raises(CurateError, match="too few to hold out 4"):
        train(TrainSpec(eval_fraction=0.9, device="cpu"), small_run, tmp_path / "t")

    spec = TrainSpec(max_steps=2, max_length=160, batch_tokens=1_000_000, eval_fraction=0.25, eval_steps=1, lora={"r": 4, "alpha": 8})
    export = locate_export(small_run, spec.layout)
    rows = datasets.load_dataset("json", data_files=str(export.path), split="train")
    held = list(split_eval(spec, rows)[1]["id"])
    assert held == list(split_eval(spec, rows)[1]["id"]) and len(held) == 1  # the same seed holds out the same row
    rec = train(spec, small_run, tmp_path / "ev")
    assert rec["eval_rows"] == 1 and rec["eval_ids"] == held and rec["rows_trained"] == 3 and rec["batch"]["rows_per_step"] == 3
    assert [c["step"] for c in rec["eval_curve"]] == [1, 2] and all(c["eval_loss"] > 0 for c in rec["eval_curve"])
    assert rec["eval_loss"] == rec["eval_curve"][-1]["eval_loss"] and rec["eval_seconds"] > 0
    assert [c["step"] for c in rec["loss_curve"]] == [1, 2] and (tmp_path / "ev" / "loss.png").stat().st_size > 0
    # tokens/s leaves out the evals inside training (both here) ...
    assert rec["tokens_per_s"] == pytest.approx(rec["tokens_this_run"] / (rec["train_seconds"] - rec["eval_seconds"]))
    # ... and the final one when eval_steps is past the last step: the eval loss of the final weights is still recorded
    # (transformers 5 evaluates at the last step inside train(); sft.py evaluates after it where a trainer does not),
    # and its seconds are not training seconds
    late = train(spec.model_copy(update={"eval_steps": 50}), small_run, tmp_path / "late")
    assert [c["step"] for c in late["eval_curve"]] == [2] and late["eval_seconds"] > 0 and late["eval_loss"] > 0
    assert late["tokens_per_s"] == pytest.approx(late["tokens_this_run"] / (late["train_seconds"] - late["eval_seconds"]))


def test_generation_stops_at_the_trained_end_of_turn(small_run, tmp_path):
    """A base whose EOS is <|endoftext|> (SmolLM2's weights, its EOS set as a base checkpoint's is)
    trained with ChatML: the adapter's generation_config.json adds <|im_end|> to eos_token_id, and
    curate's hf generation with the adapter stops there."""
    import shutil

    from curate.lm.hf import HFBackend
    from curate.lm.spec import LMParams
    from curate.models import resolve_model
    from curate.train import TrainSpec, train

    src = Path(resolve_model("smollm2-135m-instruct").location)
    base = tmp_path / "base"
    base.mkdir()
    for f in src.iterdir():
        if f.name == "model.safetensors":
            (base / f.name).symlink_to(f)
        else:
            shutil.copy(f, base / f.name)
    for name, key, value in (("generation_config.json", "eos_token_id", 0), ("config.json", "eos_token_id", 0),
                             ("tokenizer_config.json", "eos_token", "<|endoftext|>")):
        d = json.loads((base / name).read_text())
        d[key] = value
        (base / name).write_text(json.dumps(d))
    rec = train(TrainSpec(model=str(base), chat_template="chatml", max_steps=1, max_length=64, batch_tokens=256,
                          lora={"r": 4, "alpha": 8}), small_run, tmp_path / "t")
    weights = Path(rec["weights"])
    backend = HFBackend(LMParams(model=str(weights), device="cpu"))
    (out,) = backend.chat([[{"role": "user", "content": "What is the capital of France? One word."}]], {"max_tokens": 40})
    assert out["status"] == "ok" and out["finish_reason"] == "stop" and out["n_tokens"] < 40, out
    assert backend._eos_ids() == [0, 2]
    assert rec["eos_token_id"] == [2, 0] == json.loads((weights / "generation_config.json").read_text())["eos_token_id"]
    # the merged model dir that vLLM loads carries the trained end-of-turn token too
    from curate.models import merged_model_dir

    merged = json.loads((Path(merged_model_dir(str(weights))) / "generation_config.json").read_text())["eos_token_id"]
    assert sorted([merged] if isinstance(merged, int) else merged) == [0, 2]


# -- evaluation --------------------------------------------------------------------------------------


def test_always_first_judge_is_not_valid_and_reports_no_win_rate():
    """A judge that always picks the first answer used to report win_rate 0.5 as a finding; now it is
    not valid, says why, and its win rates are null. A consistent, unbiased judge keeps its rate."""
    from curate.evaluate.judge import model_points, summarise, verdict

    assert verdict("because … [[B]]") == "B" and verdict("[[A]] no wait [[C]]") == "C" and verdict("A is better") is None
    always_a = [{"verdict_model_first": "A", "verdict_model_second": "A",
                 "points_model_first": model_points("A", True), "points_model_second": model_points("A", False)}] * 3
    s = summarise(always_a)
    assert s["first_position_rate"] == 1.0 and s["consistent"] == 0.0 and s["ties"] == 3
    assert s["valid"] is False and s["win_rate"] is None and s["soft_win_rate"] is None and s["ci95"]["win_rate"] is None
    assert s["invalid_reasons"] == [
        "position bias: 100% of its decisive verdicts picked the answer shown first (allowed 25%–75%)",
        "inconsistent: 0% of the rows got the same verdict after the answers were swapped (at least 40% required)"]
    prefers_model = [{"verdict_model_first": "A", "verdict_model_second": "B", "points_model_first": 1.0, "points_model_second": 1.0},
                     {"verdict_model_first": "B", "verdict_model_second": "A", "points_model_first": 0.0, "points_model_second": 0.0},
                     {"verdict_model_first": "A", "verdict_model_second": "B", "points_model_first": 1.0, "points_model_second": 1.0},
                     {"verdict_model_first": "C", "verdict_model_second": None, "points_model_first": 0.5, "points_model_second": None}]
    s = summarise(prefers_model)
    assert s["valid"] and s["invalid_reasons"] == [] and s["first_position_rate"] == 0.5 and s["consistent"] == 1.0
    assert s["win_rate"] == pytest.approx(2 / 3) and s["wins"] == 2 and s["n_judged"] == 3 and s["n_parse_failed"] == 1
    assert s["se"]["win_rate"] == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5)  # sample sd of (1, 0, 1) over √3
    lo, hi = s["ci95"]["win_rate"]
    assert 0 <= lo < s["win_rate"] < hi <= 1


def test_eval_generates_and_judges_on_a_tiny_set(tmp_path):
    from curate.evaluate import EvalSpec, evaluate

    spec = EvalSpec(eval_set={**EVAL_SET, "limit": 2}, generate={"max_tokens": 8}, max_length=256)
    rec = evaluate("smollm2-135m-instruct", spec, tmp_path / "ev", store_dir=tmp_path / "store")
    assert rec["eval_set"]["n_rows"] == 2 and rec["loss"]["n_rows"] == 2 and rec["loss"]["ppl"] > 1
    assert rec["generation"]["n_ok"] == 2 and 0 < rec["generation"]["mean_tokens"] <= 8
    j = rec["judge"]
    # the bundled SmolLM2 judge picks the first answer: not valid, so no win rate (measured: docs/training.md)
    assert j["n_judged"] == 2 and j["n_parse_failed"] == 0 and j["first_position_rate"] == 1.0 and j["consistent"] == 0.0
    assert j["valid"] is False and j["win_rate"] is None and j["soft_win_rate"] is None and j["lc_win_rate"] is None
    assert j["invalid_reasons"][0].startswith("position bias: 100% of its decisive verdicts picked the answer shown first")
    judged = rows_of(tmp_path / "ev" / "judgments.jsonl")
    for r in judged:  # the verdict is the likeliest of A, B, C (full-vocabulary probabilities: their sum is at most 1)
        p = r["model_first"]["probs"]
        assert 0 < sum(p.values()) <= 1 + 1e-9 and r["verdict_model_first"] == max(p, key=p.get)
        assert 0 <= r["soft_points"] <= 1
    gens = rows_of(tmp_path / "ev" / "generations.jsonl")
    assert [g["prompt"][-1]["role"] for g in gens] == ["user", "user"] and all(g["reference"] for g in gens)
    # answers cut by max_tokens (8) are still judged, and counted
    assert rec["generation"]["n_truncated"] == sum(g["status"] == "truncated" for g in gens) >= 1
    again = evaluate("smollm2-135m-instruct", spec, tmp_path / "ev", store_dir=tmp_path / "store")
    assert again == rec  # recorded: nothing is generated or judged again


def test_flow_train_section_trains_after_the_run_and_curate_train_reuses_it(small_run, tmp_path):
    """`curate run` with a train: section trains after curating; `curate train <output_dir>` then finds
    the recorded section (with its --set overrides) and the finished run."""
    from typer.testing import CliRunner

    from curate.cli import app

    src = load_flow(small_run.parent / "small.yaml")
    flow = write_flow(tmp_path, name="with-train", base_dir=str(ROOT), store_dir=str(src.store), output_dir=str(tmp_path / "out"),
                      inputs=[i.model_dump(exclude_none=True) for i in src.inputs], score=[{"method": "heuristic"}],
                      select=[s.model_dump(exclude_none=True) for s in src.select],
                      export={"layouts": ["messages"], "file_types": ["jsonl"], "max_length": 256},
                      report={"plots": False}, train={"max_steps": 3, "max_length": 64})
    res = CliRunner().invoke(app, ["run", str(flow), "--set", "train.max_steps=1"])
    assert res.exit_code == 0, res.output
    assert "train: smollm2-135m-instruct (lora) on 4 rows" in res.output and "1 steps" in res.output
    assert json.loads((tmp_path / "out" / "run.json").read_text())["train"]["max_steps"] == 1
    (record,) = (tmp_path / "out" / "train").glob("*/train.json")
    stamp = record.stat().st_mtime_ns
    res = CliRunner().invoke(app, ["train", str(tmp_path / "out"), "--no-prefect"])
    assert res.exit_code == 0 and "1 steps" in res.output  # the recorded section (max_steps 1), read back: not trained again
    assert record.stat().st_mtime_ns == stamp and len(list((tmp_path / "out" / "train").iterdir())) == 1


def test_cli_eval_and_train_errors(run_dir, tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    res = CliRunner().invoke(app, ["eval", "smollm2-135m-instruct", "--on", EVAL_SET["path"], "--limit", "1", "--no-judge",
                                   "--no-prefect", "--out", str(tmp_path / "ev"), "--set", "max_length=128"])
    assert res.exit_code == 0, res.output
    assert "held-out loss" in res.output and json.loads((tmp_path / "ev" / "eval.json").read_text())["loss"]["n_rows"] == 1
    res = CliRunner().invoke(app, ["train", str(run_dir), "--set", "lora.rank=8", "--no-prefect"])
    assert res.exit_code == 2 and "lora.rank" in res.output and "unknown key" in res.output
    res = CliRunner().invoke(app, ["train", str(tmp_path), "--no-prefect"])
    assert res.exit_code == 2 and "no export here" in res.output


def test_eval_on_a_prompts_only_set_against_a_reference_model(tmp_path):
    """Koala-style rows (a request, no answer): no held-out loss; the judge compares with a reference model's answers."""
    from curate.evaluate import EvalSpec, evaluate
    from pydantic import ValidationError

    f = tmp_path / "koala.jsonl"
    f.write_text('{"id": "k0", "prompt": "Name three primary colours."}\n{"id": "k1", "prompt": ""}\n'
                 '{"id": "k2", "prompt": "What is 2 + 2?"}\n')
    with pytest.raises(ValidationError, match="reference to a model"):
        EvalSpec(eval_set={"path": str(f)}, prompt_field="prompt")
    spec = EvalSpec(eval_set={"path": str(f)}, prompt_field="prompt", reference="smollm2-135m-instruct", generate={"max_tokens": 4})
    rec = evaluate("smollm2-135m-instruct", spec, tmp_path / "ev", store_dir=tmp_path / "store")
    assert "loss" not in rec and rec["eval_set"]["n_rows"] == 2 and rec["eval_set"]["n_invalid"] == 1
    assert rec["judge"]["n_judged"] == 2 and rec["generation"]["n_ok"] == 2
    gens = rows_of(tmp_path / "ev" / "generations.jsonl")
    assert [g["answer"] for g in gens] == [g["reference"] for g in gens]  # the same greedy model on both sides


# -- the loop ----------------------------------------------------------------------------------------


@pytest.mark.prefect
def test_compare_two_selections_one_budget(prefect_harness, run_dir, tmp_path):
    """The compare flow as real Prefect flow runs, with the base model's row added by default (the file's own
    random selection is the random baseline); a re-run adds nothing."""
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from curate.cli import app

    src = load_flow(run_dir.parent / "train-src.yaml")
    flow = write_flow(tmp_path, name="pool", base_dir=str(ROOT), store_dir=str(src.store), inputs=[i.model_dump(exclude_none=True) for i in src.inputs],
                      score=[{"method": "heuristic"}], select=[], export={"layouts": ["messages"], "file_types": ["jsonl"], "max_length": 256},
                      report={"plots": False})
    cfile = tmp_path / "compare.yaml"
    cfile.write_text(json.dumps({
        "name": "cmp", "flow": flow.name, "budgets": [4],
        "selections": [{"name": "shortest", "select": [{"method": "top_k", "score": "heuristic.response_tokens", "budget": "{budget}", "descending": False}]},
                       {"name": "random", "select": [{"method": "random", "budget": "{budget}"}]}],
        "train": {"max_steps": 2, "max_length": 128, "batch_tokens": 256},
        "eval": {"eval_set": {**EVAL_SET, "limit": 2}, "generate": {"max_tokens": 4}, "max_length": 128},
        "output_dir": "out"}))
    res = CliRunner().invoke(app, ["compare", str(cfile)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    table = json.loads((out / "compare.json").read_text())["table"]
    assert [(r["selection"], r["budget"], r["selected"], r["train_steps"]) for r in table] == [
        ("base model", None, 0, 0), ("shortest", 4, 4, 2), ("random", 4, 4, 2)]
    # the bundled judge is not valid: the judge column says so, the win rates are empty, compare.md says why
    assert all(r["eval_loss"] > 0 and r["judge"] == "NOT VALID" and r["win_rate"] is None and r["eval_loss_ci95"] for r in table)
    md = (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 0 and "| shortest | 4 | 1 | 4 |" in md and "| base model |  | 1 | 0 |" in md
    assert "**The judge is not valid** in 3 of 3 cells" in md and "position bias:" in md
    assert "The judge is not valid in 3 of 3 cells" in res.output
    cell = json.loads((out / "cells" / "shortest-4-s0" / "cell.json").read_text())
    assert cell["select"][0]["budget"] == 4 and Path(cell["train"]["dir"], "train.json").exists()
    assert json.loads((out / "cells" / "shortest-4" / "run" / "export" / "manifest.json").read_text())["n_selected"] == 4

    async def flow_names():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            return sorted({(await client.read_flow(r.flow_id)).name for r in runs})

    import asyncio

    names = asyncio.run(flow_names())
    assert {"curate-compare", "curate", "curate-train", "curate-eval"} <= set(names)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("cell.json")}
    res = CliRunner().invoke(app, ["compare", str(cfile), "--no-prefect"])
    assert res.exit_code == 0, res.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("cell.json")} == stamp  # every cell recorded: nothing ran again
