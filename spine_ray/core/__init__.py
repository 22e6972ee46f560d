"""The foundation every phase stands on: typed YAML configs, storage (local or any fsspec URL),
the competition's table formats and the metric's columns, and starting Ray."""
