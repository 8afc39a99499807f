"""mci_lib: multi-concept model immunization."""
