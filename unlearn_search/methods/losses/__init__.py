"""One module per unlearning loss; ``unlearn_search.methods.METHODS`` maps each name to its class."""
