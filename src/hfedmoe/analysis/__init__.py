"""What a model's experts do: routing entropy, load balance, expert-group mutual information,
the clients' expert usage and the cost of removing an expert (``hfedmoe analyze``)."""
