"""Numbered schema migrations: mNNNN_name.py with upgrade(schema) and, when reversible, downgrade(schema)."""
