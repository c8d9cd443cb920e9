"""On-policy self-distillation under a privileged context: SSB's hint, the reference solution (OPSD-style) or a
successful peer (SDPO-style), one trainer on the shared training loop.

config.py (OnPolicyConfig and the opsd/sdpo defaults), contexts.py (StudentInput / TeacherInput and the three
context builders), losses.py (forward KL, sampled-token reverse KL as an advantage, generalised JSD, per-token
clipping, the lambda mix with SSB's offline loss), step.py (the jitted update, the EMA teacher), run.py (the
batch source that samples from the current adapters, and the run).
"""
