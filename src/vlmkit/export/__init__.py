"""Writing vlmkit models in other libraries' formats (`vlmkit export`)."""
