"""`create_model(name, num_classes=1000, pretrained=None)` and `list_models()`."""
from ppdpn.models.registry import get_model_fn, list_models, register_model  # noqa: F401
from ppdpn.models import densenet, dpn  # noqa: F401  (fill the registry)


def create_model(name: str, num_classes: int = 1000, pretrained=None,
                 new_classifier: bool = True, **kwargs):
    """Build a registered model; `pretrained` is a local .pdparams or own checkpoint. With
    new_classifier False, a classifier sized for other classes is an error instead of a
    fresh head (fine-tuning wants one; evaluation must not get one)."""
    model = get_model_fn(name)(num_classes=num_classes, **kwargs)
    if pretrained:
        from ppdpn.models.weights import load_pretrained
        load_pretrained(model, pretrained, name=name, new_classifier=new_classifier)
    return model
