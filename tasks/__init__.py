"""Tasks with checkable answers: problem generators, prompt formats, step checkers."""
