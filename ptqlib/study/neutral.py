"""Parameter values that stay out of stage ids (and labels): no imports, so the method registry
and the study schema can both read it without importing each other."""

# Keys added after studies were cached, at the value that computes what they computed before:
# left out of the stage id (study.graph.stage_id), so adding them invalidated no cache. The quantize
# grid rules' old values are the rules GPTQ / RTN used before (their new defaults change the id);
# the zero >= 1 rule that came with them changes no code of a cached stage (none had a zero of 0).
# ``precision: fp32`` is what every stage computed before the setting existed; ``generation: generate`` is
# transformers' ``generate``, the path of every evaluate stage before ptqlib's own loop (its bf16 outputs differ);
# ``loftq_iter: 1`` is LoftQ's one alternating step, all it did before the setting existed; ``base_cache: false``
# recomputes a quantized base's de-quantized weights each step, as before (``true`` keeps them: the same numbers);
# ``imatrix: false`` is llama.cpp's K-quant without an importance matrix, all kquant did before the setting existed.
ID_NEUTRAL = {"quantize": {"sym_grid": "max", "group_grid": "updated", "precision": "fp32", "imatrix": False},
              "evaluate": {"runtime": "torch", "gguf_type": "auto", "gguf_lossy": False, "speed_prompts": 0,
                           "speed_tokens": 64, "precision": "fp32", "split": "test", "ppl_windows": "first",
                           "kl_reference": False, "generation": "generate"},
              "finetune": {"pool_norm": "mean", "precision": "fp32", "loftq_iter": 1, "base_cache": False}}

# Settings that choose how a stage computes, never what: every value gives the same numbers bit for bit (a
# test holds each to it), so no value enters a stage id. ``quantizer_kernel``: L4Q / QAT-LoRA's quantizer
# compiled or eager (tests/adapters/test_quantizer_kernels.py).
ID_FREE = {"finetune": ("quantizer_kernel",)}

# The settings each method-bearing kind's parameters had for every method before methods declared
# their own (``ptqlib.methods.Options``): every stage id made before carries them, so they stay in
# every id (for a stage whose method does not read one: its default; before, a value from the study's
# ``defaults`` went in there too, so such a stage of a user's study file gets a new id, once). An
# option added later enters only the ids of the methods that declare it.
# (``sym_grid`` and ``group_grid`` came later, with RTN / GPTQ's options: in the ids of the methods that read
# them only, and there only where they act, ``QuantizeMethod.inert``.)
HISTORIC = {"quantize": ("sym", "double_quant", "blocksize", "act_order", "static_groups", "true_sequential", "damp",
                         "block_size"),
            "finetune": ("merge", "bits", "group_size", "pool", "repeat", "pool_norm")}
