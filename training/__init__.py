"""Scripts that build the models Lodestar ships: tokenizer, policy and PRM training."""
