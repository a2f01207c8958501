"""The bodies of the stage notebooks: ``quantize`` (01), ``finetune`` (02), ``evaluate`` (03, with
``lmeval``). Each takes its stage's parameters (``ptqlib.study.params``) and writes its run directory."""
