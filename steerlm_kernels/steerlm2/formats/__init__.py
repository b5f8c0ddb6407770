"""What the application's files and prompts are: records and importance weights (``records``), prompt
templates (``templates``) and the byte tokenizer (``tokenization``), labels and the example attribute
scorers (``example_scorers``), JSONL reading with one-line errors (``jsonl_stream``), and outputs that are
never lost or mixed (``outputs``: refusals and locks; ``provenance``: settings and digests).

Bottom room: imports nothing else of the application."""
