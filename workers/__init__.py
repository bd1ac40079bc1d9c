"""Model workers: the policy and the reward models behind `extend` and `score`.

Importing this package is cheap; torch and transformers load only in the modules that need them.
"""
