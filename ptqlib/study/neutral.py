"""Parameter values that stay out of stage ids (and labels): no imports, so the method registry
and the study schema can both read it without importing each other."""

# Keys added after studies were cached, at the value that computes what they computed before:
# left out of the stage id (runner.stage_id), so adding them invalidated no cache. The quantize
# grid rules' old values are the rules GPTQ / RTN used before (their new defaults change the id);
# the zero >= 1 rule that came with them changes no code of a cached stage (none had a zero of 0).
# ``precision: fp32`` is what every stage computed before the setting existed.
ID_NEUTRAL = {"quantize": {"sym_grid": "max", "group_grid": "updated", "precision": "fp32"},
              "evaluate": {"runtime": "torch", "gguf_type": "auto", "gguf_lossy": False, "speed_prompts": 0,
                           "speed_tokens": 64, "precision": "fp32", "split": "test", "ppl_windows": "first",
                           "kl_reference": False},
              "finetune": {"pool_norm": "mean", "precision": "fp32"}}
