"""The shipped configs, installed as ``virchow_fast.configs``: ``--config vit_h14_virchow2`` finds them."""
