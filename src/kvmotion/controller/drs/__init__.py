"""DRS: per-cluster load balancing and placement rules (``model``: the pure decisions; ``service``: the
snapshot it decides on, the recommendations, applying them, the automation loop)."""
