"""Every fine-tuning method of the study runs through the runner on the tiny model and evaluates."""
import csv
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

STUDY = """
study: methods
model: tiny
task: meetings
defaults:
  finetune: {steps: 3, batch_size: 2, train_samples: 8, max_length: 160, lr: 1.0e-3, rank: 4, alpha: 8}
  quantize: {group_size: 32, calib_samples: 4, calib_seq_len: 64}
  evaluate: {ppl_samples: 2, ppl_seq_len: 64, task_samples: 2, max_new_tokens: 8, batch_size: 2}
pipelines:
  l4q_w3: [{finetune: {method: l4q, bits: 3, group_size: 32}}]
  qat_lora_w4: [{finetune: {method: qat_lora, bits: 4, group_size: 32}}]
  qblora_nf4: [{quantize: nf4}, {finetune: qblora}]
  qalora_gptq: [{quantize: {method: gptq, bits: 4}}, {finetune: qalora}]  # group 32 from the base
  qablora_gptq: [{quantize: {method: gptq, bits: 4}}, {finetune: qablora}]
  merge_gptq: [{quantize: nf4}, {finetune: {method: qlora, merge: true}}, {quantize: {method: gptq, bits: 3}}]
  loftq_nf4: [{quantize: nf4}, {finetune: loftq}]
  hqq: [{quantize: {method: hqq, bits: 4}}]
  hqq_qlora: [{quantize: {method: hqq, bits: 4}}, {finetune: qlora}]
  awq_qlora: [{quantize: {method: awq, bits: 4}}, {finetune: qlora}]
  autoround_qlora: [{quantize: {method: autoround, bits: 4, iters: 2, batch_size: 4}}, {finetune: qlora}]
"""
# the fully quantized models deployed: exported to GGUF Q4_1 and scored in llama.cpp (same stages up to evaluate)
DEPLOY = """
  l4q_w3_gguf: [{finetune: {method: l4q, bits: 3, group_size: 32}},
                {evaluate: {runtime: llama.cpp, speed_prompts: 1, speed_tokens: 4}}]
  qablora_gguf: [{quantize: {method: gptq, bits: 4}}, {finetune: qablora}, {evaluate: {runtime: llama.cpp}}]
  hqq_gguf: [{quantize: {method: hqq, bits: 4}}, {evaluate: {runtime: llama.cpp}}]
"""


def test_all_methods_run_and_deploy(tmp_path):
    from ptqlib.deploy import llamacpp

    deploy = llamacpp.available() or os.environ.get("PTQLIB_REQUIRE_LLAMACPP") == "1"
    (tmp_path / "m.yaml").write_text(STUDY + (DEPLOY.lstrip("\n") if deploy else ""))
    p = subprocess.run([sys.executable, "-m", "ptqlib", "run", str(tmp_path / "m.yaml"), "--runs",
                        str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")], cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-5000:]
    rows = {r["pipeline"]: r for r in csv.DictReader(open(tmp_path / "reports/methods/results.csv"))}
    torch_rows = {"l4q_w3", "qat_lora_w4", "qblora_nf4", "qalora_gptq", "qablora_gptq", "merge_gptq", "loftq_nf4", "hqq",
                  "hqq_qlora", "awq_qlora", "autoround_qlora"}
    assert set(rows) == torch_rows | ({"l4q_w3_gguf", "qablora_gguf", "hqq_gguf"} if deploy else set())
    for name, r in rows.items():
        assert r["status"] == "ok", name
        assert float(r["ppl"]) > 1
    artifacts = {}
    for rec_file in (tmp_path / "runs").glob("*/metrics.json"):
        d = rec_file.parent
        rec = json.loads(rec_file.read_text())
        if rec["kind"] == "finetune":
            key = rec["params"]["method"] + ("+merge" if rec["params"].get("merge") else "")
            artifacts[key] = json.loads((d / "artifact.json").read_text())
    # L4Q and the QA-* merges leave a fully quantized model (no adapter); Q-BLoRA keeps its adapter
    assert artifacts["l4q"]["type"] == "quant"
    assert artifacts["qalora"]["type"] == "quant" and artifacts["qablora"]["type"] == "quant"
    assert artifacts["qblora"]["type"] == "blora" and artifacts["qat_lora"]["type"] == "qat_lora"
    assert artifacts["loftq"]["type"] == "peft"  # QLoRA's adapter on the nf4 stage's codes, started by LoftQ
    assert artifacts["qlora+merge"]["type"] == "hf"  # merged into the de-quantized weights
    assert artifacts["qlora"]["type"] == "peft"  # on HQQ's QuantLinear codes
    for name in ("hqq", "awq", "autoround"):  # the peer PTQ baselines under QLoRA
        assert rows[f"{name}_qlora"]["quantize.method"] == name and float(rows[f"{name}_qlora"]["field_f1"]) >= 0
    # equal trainable parameters for Q-BLoRA and LoRA-r: r*(in+out) summed over the 14 target layers
    r = 4
    lora = 2 * sum(r * (i + o) for i, o in [(128, 128), (128, 64), (128, 64), (128, 128), (128, 256), (128, 256),
                                            (256, 128)])
    assert int(rows["qblora_nf4"]["finetune.trainable_params"]) == lora
    if deploy:  # the same weights in llama.cpp: codes copied exactly, perplexity within kernel rounding
        for gguf_name, torch_name in [("l4q_w3_gguf", "l4q_w3"), ("qablora_gguf", "qablora_gptq"), ("hqq_gguf", "hqq")]:
            g, t = rows[gguf_name], rows[torch_name]
            assert int(float(g["gguf_requantized_tensors"])) == 0 and float(g["gguf_max_abs_err_exact"]) < 1e-3
            assert abs(float(g["ppl"]) / float(t["ppl"]) - 1) < 0.02, (gguf_name, g["ppl"], t["ppl"])
            assert (tmp_path / "runs" / g["eval_stage"] / "model.gguf").exists()
        assert float(rows["l4q_w3_gguf"]["decode_tokens_per_s"]) > 0
