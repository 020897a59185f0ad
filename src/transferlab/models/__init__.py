"""Model builders and offline pretrained-weight loaders."""
