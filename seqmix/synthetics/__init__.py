"""Synthetic recall tasks: MQAR data (zoology's semantics), training sweeps over state size and the plot (`seqmix mqar`)."""
