"""Pure numerics: tensors in, tensors or frozen results out. No files, printing, env or device picking."""
