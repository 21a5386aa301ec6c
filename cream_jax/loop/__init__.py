"""The generic stages of the loop, one file each: rollout, logprobs (log-prob tables), curate
(rewards -> consistency -> pairs -> records, through a method's hooks), trainer, stages (M0 -> M1
-> iterations, resume)."""
