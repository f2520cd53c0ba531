"""On-disk formats: TFRecord framing, tf.train.Example wire encoding, tar/WebDataset members."""
