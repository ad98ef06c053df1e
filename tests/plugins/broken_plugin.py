"""A method plugin whose import fails, as a plugin with a missing dependency does."""
import cemabench_test_no_such_dependency  # noqa: F401
