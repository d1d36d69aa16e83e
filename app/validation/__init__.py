"""Training-data validation: checks a fine-tuning file before any money is spent on it.

The pure engine (`engine.validate_file`) reads a file once, streaming, and returns a report of
every error and warning with line numbers, exact token counts with the target model's
tokenizer, statistics and a cost estimate. It has no database, HTTP or network dependency;
`catalog` knows the target models, `tokens` the tokenizers. The API, the repository and the
background validator are built on top of it in this package's other modules.
"""
