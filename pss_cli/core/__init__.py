"""Pure numerics: tensors in, tensors or frozen results out.

No files, printing, environment variables or device picking."""
