"""Asset families, one module each (raw, traces, etl_b, curation, ...). definitions.py loads every module
in this package, so adding a family never means editing the definitions."""
