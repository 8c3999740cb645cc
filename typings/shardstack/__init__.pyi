# Type-checking only (pyproject [tool.mypy] mypy_path): lets mypy resolve
# `shardstack.core` imports in netio/ to core/, which the editable install maps
# through an import hook mypy cannot follow.
