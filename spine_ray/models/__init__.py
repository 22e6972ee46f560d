"""The networks: plain nn.Modules with typed configs, no Ray. The shared backbone (`backbone`),
stage 1's keypoint localiser, stage 2's grader, the one-stage net, heatmap decoding and losses,
backbone freezing."""
