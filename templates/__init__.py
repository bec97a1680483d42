"""The runner notebooks `sweeper notebook` renders (packaged as sweeper.templates)."""
