"""The built-in Bayes classifier: tokenizer, Robinson-Fisher classifier, token store, training.

`gateway.filters.bayes` is the filter that uses it at the end of DATA;
`gateway.bayes.cli` is ``mailgatectl bayes`` (train, stats, forget);
`gateway.bayes.training.train` is how the quarantine trains a message.
"""
