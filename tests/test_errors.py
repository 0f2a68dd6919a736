"""`tapekit.errors`: one line for the user out of what TensorFlow and Keras raise."""

from tapekit.errors import TapekitError, summarize, user_message


def test_user_message_drops_what_autograph_puts_before_a_tapekit_error():
    traced = ValueError("in user code:\n\n    File \"step.py\", line 3, in train_step  *\n"
                        "        loss = self.compute_loss(x)\n\n"
                        "    TapekitError: compute_loss needs one loss per example")
    assert user_message(traced) == "compute_loss needs one loss per example"
    assert user_message(TapekitError("plain line")) == "plain line"
    assert user_message(RuntimeError("")) == ""


def test_summarize_finds_the_real_message_inside_keras_and_autograph_wrapping():
    keras_error = ValueError(
        "Exception encountered when calling Dense.call().\n\n"
        "\x1b[1mInput 0 of layer \"dense\" is incompatible with the layer: expected axis -1 "
        "of input shape to have value 5\x1b[0m\n\nArguments received by Dense.call():\n"
        "  • inputs=tf.Tensor(shape=(32, 3), dtype=float32)")
    assert summarize(keras_error) == ('Input 0 of layer "dense" is incompatible with the layer: '
                                      "expected axis -1 of input shape to have value 5")
    autograph = TypeError("in user code:\n\n    File \"x.py\", line 9, in step  *\n"
                          "        y = a + b\n\n    TypeError: cannot add int32 and float32")
    assert summarize(autograph) == "cannot add int32 and float32"
    assert summarize(KeyError()) == "KeyError"
