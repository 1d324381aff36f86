"""The method's maths with no trainer in it: unlearning losses, the weight update and its budget rule, the
weighted sampler, alignment objectives, the refresh schedule, and log-prob helpers."""
