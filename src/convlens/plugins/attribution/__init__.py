"""Attribution methods beyond Grad-CAM and saliency, one module each on the shared attribution base
(:mod:`convlens.attribution`): the CAM family (HiResCAM, LayerCAM, XGradCAM, EigenCAM, ScoreCAM, AblationCAM) and
the input attributions (Integrated Gradients, Input x Gradient, SmoothGrad, Guided Backprop, Guided Grad-CAM,
Occlusion). Each module registers a visualizer, and an activation filter where the map needs no more than a
layer's activations and gradients."""
